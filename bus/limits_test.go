package bus_test

import (
	"io"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/internal/testenv"
)

// TestConnectionsCapped: a flood of connections that never authenticate
// is capped at bus.DefaultMaxConns when the config names no
// max_connections: the connections over it are refused at once with
// "maximum connections exceeded" (instead of each holding a descriptor
// until its handshake times out, up to the 64K nats-server default).
func TestConnectionsCapped(t *testing.T) {
	b := testenv.StartBus(t)
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
	refused := 0
	for _, c := range conns[bus.DefaultMaxConns:] {
		c.SetReadDeadline(time.Now().Add(30 * time.Second))
		got, _ := io.ReadAll(c)
		if strings.Contains(string(got), "maximum connections exceeded") {
			refused++
		}
	}
	if refused == 0 {
		t.Fatalf("none of the %d connections over %d was refused", over, bus.DefaultMaxConns)
	}
}
