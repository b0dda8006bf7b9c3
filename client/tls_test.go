package client_test

import (
	"context"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"

	"github.com/volumed/volumed/client"
	"github.com/volumed/volumed/internal/pki"
)

// TestRootCAs: with volumed's CA the client reaches an HTTPS server over
// HTTP/2 and sends requested_by as a filter; without it, the certificate
// is refused; DefaultCA finds the CA of $VOLUMED_DATA_DIR.
func TestRootCAs(t *testing.T) {
	dataDir := t.TempDir()
	ca, err := pki.LoadCA(filepath.Join(dataDir, pki.DirName))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ca.Issue("volumed", []string{"127.0.0.1"}, 0); err == nil {
		t.Fatal("a certificate of no lifetime was issued")
	}
	k, err := pki.NewKeeper(pki.KeeperConfig{Issuer: ca, Name: "volumed", Hosts: []string{"127.0.0.1"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := k.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer k.Close(context.Background())
	var proto, filter string
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{TLSConfig: pki.Trust{Certs: k}.Server(), Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		proto, filter = r.Proto, r.URL.Query().Get("requested_by")
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`[]`))
	})}
	go func() { _ = srv.ServeTLS(ln, "", "") }()
	defer srv.Close()
	url := "https://" + ln.Addr().String()

	t.Setenv("VOLUMED_DATA_DIR", dataDir)
	caFile := client.DefaultCA()
	if caFile != filepath.Join(dataDir, client.CAFile) {
		t.Fatalf("DefaultCA = %q", caFile)
	}
	roots, err := client.LoadCA(caFile)
	if err != nil {
		t.Fatal(err)
	}
	c, err := client.New(url, client.WithRootCAs(roots))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.ListOperations(context.Background(), client.ListOptions{RequestedBy: "api-token:ci@10.0.0.1"}); err != nil {
		t.Fatalf("over HTTPS with volumed's CA: %v", err)
	}
	if proto != "HTTP/2.0" || filter != "api-token:ci@10.0.0.1" {
		t.Fatalf("served over %s with requested_by %q", proto, filter)
	}
	plain, _ := client.New(url)
	if _, err := plain.ListOperations(context.Background(), client.ListOptions{}); err == nil {
		t.Fatal("a client without volumed's CA trusted its certificate")
	}
	if err := os.WriteFile(filepath.Join(dataDir, "junk.pem"), []byte("junk"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := client.LoadCA(filepath.Join(dataDir, "junk.pem")); err == nil {
		t.Fatal("LoadCA of a file without a certificate succeeded")
	}
}
