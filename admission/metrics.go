package admission

import (
	"context"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// scrapeTimeout bounds the GPU and disk reads of one scrape.
const scrapeTimeout = 5 * time.Second

// Collector exports host memory, disk, GPU memory, claims and rejections,
// read at scrape time (nothing is cached or updated by a loop, so nothing
// drifts). Register it on the hive's registry. A source that fails to read
// is left out of that scrape and counted in
// rbee_hive_resource_read_errors_total: a failure never looks like zero and
// never blanks the rest of /metrics.
type Collector struct {
	l *Ledger

	memAvail, memUsed, memTotal, memClaimed          *prometheus.Desc
	vramAvail, vramUsed, vramTotal, vramClaimed, gpu *prometheus.Desc
	diskAvail, diskUsed, diskTotal                   *prometheus.Desc
	rejections, readErrors                           *prometheus.Desc
}

var _ prometheus.Collector = (*Collector)(nil)

// Collector returns the ledger's metrics collector.
func (l *Ledger) Collector() *Collector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("rbee_hive_"+name, help, labels, nil)
	}
	return &Collector{
		l:           l,
		memAvail:    d("memory_available_bytes", "Host memory available for new work without swapping (MemAvailable)."),
		memUsed:     d("memory_used_bytes", "Host memory in use: MemTotal minus MemAvailable."),
		memTotal:    d("memory_total_bytes", "Host memory size (MemTotal)."),
		memClaimed:  d("memory_claimed_bytes", "Memory limits of workers admitted but not yet loaded."),
		vramAvail:   d("vram_available_bytes", "GPU memory free as reported by the driver.", "gpu"),
		vramUsed:    d("vram_used_bytes", "GPU memory allocated, excluding driver-reserved memory where the driver says.", "gpu"),
		vramTotal:   d("vram_total_bytes", "GPU memory size.", "gpu"),
		vramClaimed: d("vram_claimed_bytes", "GPU memory claimed by admitted workers and not yet visible in the driver's figures.", "gpu"),
		gpu:         d("gpu_info", "GPU identity; value is always 1. gpu is the hive's device index.", "gpu", "uuid", "name"),
		diskAvail:   d("disk_available_bytes", "Filesystem space available to unprivileged users (f_bavail).", "path"),
		diskUsed:    d("disk_used_bytes", "Filesystem space in use (blocks minus free blocks).", "path"),
		diskTotal:   d("disk_total_bytes", "Filesystem size.", "path"),
		rejections:  d("admission_rejections_total", "Requests refused for lack of a resource.", "resource"),
		readErrors:  d("resource_read_errors_total", "Failed reads of a resource source during scrapes.", "source"),
	}
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{
		c.memAvail, c.memUsed, c.memTotal, c.memClaimed,
		c.vramAvail, c.vramUsed, c.vramTotal, c.vramClaimed, c.gpu,
		c.diskAvail, c.diskUsed, c.diskTotal, c.rejections, c.readErrors,
	} {
		ch <- d
	}
}

var readSources = [...]string{"memory", "gpu", "disk"}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	l := c.l
	// NewConstMetric, not Must…: a driver-supplied label (a GPU name
	// with invalid UTF-8) must drop one sample, not panic the scrape.
	emit := func(d *prometheus.Desc, t prometheus.ValueType, v float64, labels ...string) {
		if m, err := prometheus.NewConstMetric(d, t, v, labels...); err == nil {
			ch <- m
		}
	}
	gauge := func(d *prometheus.Desc, v uint64, labels ...string) {
		emit(d, prometheus.GaugeValue, float64(v), labels...)
	}
	if m, err := l.cfg.Memory.Memory(); err != nil {
		l.scrapeErrs[0].Add(1)
	} else {
		gauge(c.memAvail, m.AvailableBytes)
		gauge(c.memUsed, m.UsedBytes)
		gauge(c.memTotal, m.TotalBytes)
	}
	l.mu.Lock()
	claimed := l.memoryClaimedLocked()
	l.mu.Unlock()
	gauge(c.memClaimed, claimed)

	ctx, cancel := context.WithTimeout(context.Background(), scrapeTimeout)
	defer cancel()
	if l.cfg.GPUs != nil {
		views, err := l.gpuViews(ctx)
		if err != nil {
			l.scrapeErrs[1].Add(1)
		}
		// No GPU: the vram families are simply absent.
		for _, v := range views {
			idx := strconv.Itoa(v.dev.Index)
			gauge(c.vramAvail, v.dev.MemoryFree, idx)
			gauge(c.vramUsed, v.dev.MemoryUsed, idx)
			gauge(c.vramTotal, v.dev.MemoryTotal, idx)
			gauge(c.vramClaimed, v.unseen, idx)
			emit(c.gpu, prometheus.GaugeValue, 1, idx, v.dev.UUID, v.dev.Name)
		}
	}
	for _, p := range l.cfg.DiskPaths {
		d, err := l.disk.Usage(ctx, p)
		if err != nil {
			l.scrapeErrs[2].Add(1)
			continue
		}
		gauge(c.diskAvail, d.AvailableBytes, p)
		gauge(c.diskUsed, d.UsedBytes, p)
		gauge(c.diskTotal, d.TotalBytes, p)
	}
	for i, r := range resources {
		emit(c.rejections, prometheus.CounterValue, float64(l.rejections[i].Load()), r)
	}
	for i, s := range readSources {
		emit(c.readErrors, prometheus.CounterValue, float64(l.scrapeErrs[i].Load()), s)
	}
}
