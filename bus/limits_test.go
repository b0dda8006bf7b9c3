package bus_test

import (
	"context"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/volumed/volumed/bus"
)

// TestConnectionsCapped: a flood of connections that never authenticate
// is capped at bus.DefaultMaxConns when the config names no
// max_connections: the connections over it are refused at once with
// "maximum connections exceeded" (instead of each holding a descriptor
// until its handshake times out, up to the 64K nats-server default).
func TestConnectionsCapped(t *testing.T) {
	// The flood must be open at once: a long authentication timeout keeps
	// the first connections while the last are dialled, however slow.
	conf := filepath.Join(t.TempDir(), "nats.conf")
	if err := os.WriteFile(conf, []byte("listen: 127.0.0.1:-1\nauthorization { timeout: 120 }\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	b := bus.New(bus.Config{ConfigFile: conf, DataDir: t.TempDir()})
	if err := b.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer b.Close(context.Background())
	u, err := url.Parse(b.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	const over = 10
	conns := make([]net.Conn, 0, bus.DefaultMaxConns+over)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range bus.DefaultMaxConns + over {
		c, err := net.DialTimeout("tcp", u.Host, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	// Read at once: an accepted connection only times out.
	var refused atomic.Int32
	var wg sync.WaitGroup
	for _, c := range conns[bus.DefaultMaxConns:] {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.SetReadDeadline(time.Now().Add(30 * time.Second))
			got, _ := io.ReadAll(c)
			if strings.Contains(string(got), "maximum connections exceeded") {
				refused.Add(1)
			}
		}()
	}
	wg.Wait()
	if refused.Load() == 0 {
		t.Fatalf("none of the %d connections over %d was refused", over, bus.DefaultMaxConns)
	}
}
