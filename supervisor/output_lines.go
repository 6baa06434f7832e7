package supervisor

import (
	"bytes"
	"io"
)

// outStream turns one output stream's bytes into the log sink's lines. It
// keeps only a line still waiting for its newline, so an idle stream holds
// no buffer. Lines are cut as a 16 KiB bufio.Reader's ReadSlice would cut
// them: at each newline, and every maxLine bytes of a longer line; what is
// left at EOF is a last line.
type outStream struct {
	sink    *logSink
	stream  string
	partial []byte // len < maxLine
}

// keepPartial is the largest partial-line buffer kept once its line ends;
// a bigger one (a long line) is dropped so an idle stream stays small.
const keepPartial = 512

func (o *outStream) feed(data []byte) {
	for len(data) > 0 {
		seg := data
		if room := maxLine - len(o.partial); len(seg) > room {
			seg = seg[:room]
		}
		i := bytes.IndexByte(seg, '\n')
		switch {
		case i >= 0:
			o.emit(seg[:i])
			data = data[i+1:]
		case len(o.partial)+len(seg) == maxLine:
			o.emit(seg)
			data = data[len(seg):]
		default:
			o.partial = append(o.partial, seg...)
			return
		}
	}
}

// emit writes the partial line followed by rest as one line.
func (o *outStream) emit(rest []byte) {
	if len(o.partial) == 0 {
		o.sink.write(o.stream, rest)
		return
	}
	o.partial = append(o.partial, rest...)
	o.sink.write(o.stream, o.partial)
	if cap(o.partial) > keepPartial {
		o.partial = nil
	} else {
		o.partial = o.partial[:0]
	}
}

// end writes what is left as a last line (EOF).
func (o *outStream) end() {
	if len(o.partial) > 0 {
		o.sink.write(o.stream, o.partial)
	}
	o.partial = nil
}

// readAll copies r into the stream until EOF or an error, with a goroutine
// of its own: the fallback when the output poller cannot take a pipe.
func (o *outStream) readAll(r io.Reader) {
	buf := make([]byte, 4096)
	for {
		n, err := r.Read(buf)
		o.feed(buf[:n])
		if err != nil { // EOF or a failed read: nothing more will come
			o.end()
			return
		}
	}
}

// pump reads one stream until EOF (every writer gone) and closes it.
func (l *logSink) pump(stream string, r io.ReadCloser) {
	defer r.Close()
	(&outStream{sink: l, stream: stream}).readAll(r)
}
