package bus_test

import (
	"context"
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
	// The server registers connections in goroutines of their own, so the
	// refused ones are not always the last dialled: read them all until
	// `over` were refused (each accepted one only waits for CONNECT).
	var refused atomic.Int32
	var wg sync.WaitGroup
	for _, c := range conns {
		c.SetReadDeadline(time.Now().Add(30 * time.Second))
		wg.Add(1)
		go func() {
			defer wg.Done()
			// A refused connection is not always closed at once: read
			// until the error, not to the end.
			var got []byte
			buf := make([]byte, 512)
			for {
				n, err := c.Read(buf)
				got = append(got, buf[:n]...)
				if strings.Contains(string(got), "maximum connections exceeded") {
					refused.Add(1)
					return
				}
				if err != nil {
					return
				}
			}
		}()
	}
	for deadline := time.Now().Add(30 * time.Second); refused.Load() < over && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	for _, c := range conns {
		c.SetReadDeadline(time.Now())
	}
	wg.Wait()
	if n := refused.Load(); n < over {
		t.Fatalf("%d of the %d connections over %d were refused", n, over, bus.DefaultMaxConns)
	}
}
