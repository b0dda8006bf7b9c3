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
