package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rbee/rbee-hive/internal/testkit"
)

// selfSigned writes a self-signed certificate for 127.0.0.1 and its key
// (PEM) to dir and returns their paths and a pool trusting it.
func selfSigned(t *testing.T, dir string) (certPath, keyPath string, pool *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "rbee-hive test"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1")},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certPath, keyPath = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool = x509.NewCertPool()
	pool.AddCert(cert)
	return certPath, keyPath, pool
}

// TestTLSAndMetricsListener: with tls_cert/tls_key the API answers HTTPS
// to a client that verifies the certificate (and nothing over plain HTTP);
// metrics_listen serves GET /metrics and GET /v1/health in plain HTTP
// without a token, and nothing else, not even with the token.
func TestTLSAndMetricsListener(t *testing.T) {
	certPath, keyPath, pool := selfSigned(t, t.TempDir())
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}, Timeout: 10 * time.Second}
	mport := testkit.FreePort(t)
	d := startDaemonWith(t, "https", client, fmt.Sprintf("metrics_listen = \"127.0.0.1:%d\"\ntls_cert = %q\ntls_key = %q\n", mport, certPath, keyPath))

	resp, err := client.Get(d.url + "/v1/health")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.TLS == nil || len(resp.TLS.PeerCertificates) == 0 || resp.TLS.PeerCertificates[0].Subject.CommonName != "rbee-hive test" {
		t.Fatalf("not served with the configured certificate: %+v", resp.TLS)
	}
	if code, body := d.request("GET", "/v1/workers/list", ""); code != 200 {
		t.Fatalf("API over TLS: %d %s", code, body)
	}
	// The CLI with the hive's config speaks HTTPS and trusts tls_cert.
	cliCfg := filepath.Join(t.TempDir(), "cli.toml")
	if err := os.WriteFile(cliCfg, []byte(fmt.Sprintf("listen = %q\nstate_dir = %q\ntls_cert = %q\ntls_key = %q\n",
		strings.TrimPrefix(d.url, "https://"), d.stateDir, certPath, keyPath)), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(filepath.Join(bins.dir, "rbee-hive"), "workers", "list", "--config", cliCfg).CombinedOutput(); err != nil {
		t.Fatalf("rbee-hive workers list over TLS: %v\n%s", err, out)
	}
	// A client that does not trust the certificate is refused.
	if _, err := http.Get(d.url + "/v1/health"); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("untrusting client: %v, want a certificate error", err)
	}
	// Plain HTTP to the TLS port gets no API answer.
	plain := strings.Replace(d.url, "https://", "http://", 1)
	if resp, err := http.Get(plain + "/v1/health"); err == nil {
		resp.Body.Close()
		if resp.StatusCode == 200 {
			t.Fatal("plain HTTP answered 200 on the TLS listener")
		}
	}

	murl := fmt.Sprintf("http://127.0.0.1:%d", mport)
	get := func(method, path string, token bool) (int, string) {
		t.Helper()
		req, _ := http.NewRequest(method, murl+path, nil)
		if token {
			req.Header.Set("Authorization", "Bearer "+d.token())
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get("GET", "/metrics", false); code != 200 || !strings.Contains(body, "rbee_hive_build_info") {
		t.Fatalf("metrics listener /metrics: %d %.200s", code, body)
	}
	if code, _ := get("GET", "/v1/health", false); code != 200 {
		t.Fatalf("metrics listener /v1/health: %d", code)
	}
	for _, r := range []struct{ method, path string }{
		{"GET", "/v1/workers/list"}, {"POST", "/v1/workers/spawn"}, {"GET", "/v1/models"},
		{"POST", "/v1/models/download"}, {"POST", "/v1/workers/ready"}, {"POST", "/metrics"},
	} {
		if code, body := get(r.method, r.path, true); code == 200 || code == 401 || code == 403 || (code >= 200 && code < 300) {
			t.Errorf("metrics listener %s %s with the token: %d %.100s, want 404/405", r.method, r.path, code, body)
		}
	}
}

// TestTLSUnreadable: a tls_cert that cannot be read stops the hive at
// start with an error naming it.
func TestTLSUnreadable(t *testing.T) {
	dir := t.TempDir()
	certPath, keyPath, _ := selfSigned(t, dir)
	for name, cfg := range map[string]string{
		"missing cert": fmt.Sprintf("tls_cert = %q\ntls_key = %q\n", certPath+".nope", keyPath),
		"key mismatch": fmt.Sprintf("tls_cert = %q\ntls_key = %q\n", certPath, certPath),
	} {
		t.Run(name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "hive.toml")
			body := fmt.Sprintf("listen = \"127.0.0.1:%d\"\nstate_dir = %q\nruntime_dir = %q\n%s",
				testkit.FreePort(t), filepath.Join(dir, "state"), filepath.Join(dir, "run"), cfg)
			if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
				t.Fatal(err)
			}
			out, err := exec.Command(filepath.Join(bins.dir, "rbee-hive"), "daemon", "--config", p).CombinedOutput()
			if err == nil || !strings.Contains(string(out), "tls_cert") {
				t.Fatalf("hive with %s: %v\n%s", name, err, out)
			}
		})
	}
}
