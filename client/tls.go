package client

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
)

// CAFile is where volumed keeps its CA certificate in its data dir.
const CAFile = "tls/ca.pem"

// DefaultDataDirs are the data dirs DefaultCA looks in, in order, after
// $VOLUMED_DATA_DIR: a volumed run from this directory, and the one the
// systemd unit runs.
var DefaultDataDirs = []string{"volumed-data", "/var/lib/volumed"}

// DefaultCA is the CA certificate of a volumed on this host: CAFile under
// $VOLUMED_DATA_DIR or the first of DefaultDataDirs holding one; "" when
// none is found.
func DefaultCA() string {
	dirs := DefaultDataDirs
	if d := os.Getenv("VOLUMED_DATA_DIR"); d != "" {
		dirs = append([]string{d}, dirs...)
	}
	for _, d := range dirs {
		p := filepath.Join(d, CAFile)
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return ""
}

// LoadCA reads a PEM file of CA certificates into a pool.
func LoadCA(path string) (*x509.CertPool, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("client: CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(data) {
		return nil, fmt.Errorf("client: CA: no certificate in %s", path)
	}
	return pool, nil
}

// TLSConfig is a client TLS configuration that trusts roots (the
// system's when nil).
func TLSConfig(roots *x509.CertPool) *tls.Config {
	return &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: roots}
}

// WithRootCAs verifies an https server with roots, volumed's CA (LoadCA),
// over HTTP/2 or HTTP/1.1. It replaces the transport of the HTTP client,
// keeping its timeout: give it after WithHTTPClient.
func WithRootCAs(roots *x509.CertPool) Option {
	return func(c *Client) {
		hc := &http.Client{}
		if c.http != nil {
			*hc = *c.http
		}
		hc.Transport = &http.Transport{Proxy: http.ProxyFromEnvironment, TLSClientConfig: TLSConfig(roots),
			ForceAttemptHTTP2: true, MaxIdleConnsPerHost: 16}
		c.http = hc
	}
}
