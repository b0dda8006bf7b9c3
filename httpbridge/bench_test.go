package httpbridge_test

import (
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/volumed/volumed/commands"
)

// BenchmarkCreate measures POST /volumes end to end: HTTP, the test
// command service in process, a KV write, the reply.
func BenchmarkCreate(b *testing.B) {
	h := newHarness(b, options{})
	body := readTestdata(b, "create.json")
	client := &http.Client{}
	b.ReportAllocs()
	for b.Loop() {
		resp, err := client.Post(h.base+"/volumes", "application/json", strings.NewReader(body))
		if err != nil {
			b.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusCreated {
			b.Fatalf("status %d", resp.StatusCode)
		}
	}
}

// BenchmarkGetOperation measures GET /operations/{id} from the KV store,
// without and with a ?wait on a terminal operation (subscribe, flush,
// read).
func BenchmarkGetOperation(b *testing.B) {
	h := newHarness(b, options{})
	h.seedOperation(b, opAttach, commands.OpAttach, commands.StatusCompleted, vol1, vm1, 31)
	client := &http.Client{}
	for _, query := range []string{"", "?wait=30s"} {
		b.Run("query="+query, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				resp, err := client.Get(h.base + "/operations/" + opAttach + query)
				if err != nil {
					b.Fatal(err)
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					b.Fatalf("status %d", resp.StatusCode)
				}
			}
		})
	}
}

// BenchmarkGetOperationTLS measures GET /operations/{id} over plain HTTP
// and over HTTPS (HTTP/2 on one kept connection, and a new TLS connection
// per request: a full handshake each).
func BenchmarkGetOperationTLS(b *testing.B) {
	for _, tc := range []struct {
		name      string
		tls, keep bool
	}{{"http", false, true}, {"https-kept", true, true}, {"https-new-connection", true, false}} {
		b.Run(tc.name, func(b *testing.B) {
			h := newHarness(b, options{tls: tc.tls})
			h.seedOperation(b, opAttach, commands.OpAttach, commands.StatusCompleted, vol1, vm1, 31)
			client := h.client
			if client == nil {
				client = &http.Client{}
			}
			if !tc.keep {
				tr := client.Transport.(*http.Transport).Clone()
				tr.DisableKeepAlives = true
				client = &http.Client{Transport: tr}
			}
			b.ReportAllocs()
			for b.Loop() {
				resp, err := client.Get(h.base + "/operations/" + opAttach)
				if err != nil {
					b.Fatal(err)
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					b.Fatalf("status %d", resp.StatusCode)
				}
			}
		})
	}
}
