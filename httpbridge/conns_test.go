package httpbridge_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/volumed/volumed/internal/testenv"
)

// TestConnectionsCapped: clients that open connections and dribble or send
// nothing (slowloris, half-open) hold at most MaxConns of the bridge's
// file descriptors; the rest wait in the kernel's listen queue, and are
// served once the held connections close.
func TestConnectionsCapped(t *testing.T) {
	const maxConns, extra = 2, 50
	h := newHarness(t, options{maxConns: maxConns, readHeaderTimeout: time.Minute, readTimeout: time.Minute})
	addr := strings.TrimPrefix(strings.TrimSuffix(h.base, "/api/v1"), "http://")
	_, port, _ := net.SplitHostPort(addr)
	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for range maxConns + extra {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
		if _, err := io.WriteString(c, "GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\nX-Slow: "); err != nil {
			t.Fatal(err)
		}
	}
	testenv.Eventually(t, 10*time.Second, func() bool { return acceptQueue(t, port) == extra },
		"%d connections waiting in the listen queue, not accepted", extra)

	for _, c := range held {
		c.Close()
	}
	held = nil
	resp, body := h.do(t, http.MethodGet, "/health", "")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("health after the held connections closed: %d %s", resp.StatusCode, body)
	}
}

// acceptQueue is the number of connections waiting in the accept queue of
// the loopback IPv4 socket listening on port (/proc/net/tcp: rx_queue of
// a socket in state LISTEN).
func acceptQueue(t *testing.T, port string) int {
	t.Helper()
	p, err := strconv.Atoi(port)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open("/proc/net/tcp")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	want := fmt.Sprintf("0100007F:%04X", p)
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 || fields[1] != want || fields[3] != "0A" {
			continue
		}
		_, rx, _ := strings.Cut(fields[4], ":")
		n, err := strconv.ParseUint(rx, 16, 32)
		if err != nil {
			t.Fatal(err)
		}
		return int(n)
	}
	t.Fatalf("no listening socket on %s in /proc/net/tcp", want)
	return 0
}
