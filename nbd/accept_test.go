package nbd

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/volumed/volumed/internal/testenv"
)

// syncBuffer is a bytes.Buffer safe for a logger and a test to share.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// TestAcceptSurvivesFDExhaustion: while the process is out of file
// descriptors (a flood on another listener does that) a client's accept
// fails with EMFILE; the server keeps accepting, and serves that client
// once descriptors are free again, instead of leaving its accept loop for
// good.
func TestAcceptSurvivesFDExhaustion(t *testing.T) {
	var logs syncBuffer
	s := startServerWith(t, Config{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	setExports(t, s, ExportSpec{Name: "vol00000001", Path: backingFile(t, "a.img", pattern(mib, 1))})

	var saved unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &saved); err != nil {
		t.Fatal(err)
	}
	// Fill every descriptor under a lowered limit, then free exactly one
	// for the client's socket: the server's accept then has none.
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	low := saved
	low.Cur = uint64(len(ents)) + 64
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &low); err != nil {
		t.Fatal(err)
	}
	var fillers []int
	release := func() {
		for _, fd := range fillers {
			unix.Close(fd)
		}
		fillers = nil
		if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &saved); err != nil {
			t.Errorf("restore RLIMIT_NOFILE: %v", err)
		}
	}
	defer release()
	for {
		fd, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			break
		}
		fillers = append(fillers, fd)
	}
	unix.Close(fillers[len(fillers)-1])
	fillers = fillers[:len(fillers)-1]
	nc, err := net.DialTimeout("tcp", s.Addr().String(), 5*time.Second)
	if err != nil {
		t.Fatalf("dial with one descriptor free: %v", err)
	}
	defer nc.Close()
	testenv.Eventually(t, 10*time.Second, func() bool {
		return strings.Contains(logs.String(), "too many open files")
	}, "an accept failing with EMFILE")
	release()

	// The queued client is accepted once descriptors are free.
	nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	var hello [18]byte
	if _, err := nc.Read(hello[:]); err != nil {
		t.Fatalf("no greeting after descriptors were freed: %v", err)
	}
	c, err := dialWire(t, s.Addr(), "vol00000001")
	if err != nil {
		t.Fatalf("new client after the exhaustion: %v", err)
	}
	if errno, data, err := c.cmd(cmdRead, 0, 0, 512, nil); err != nil || errno != 0 || !bytes.Equal(data, pattern(mib, 1)[:512]) {
		t.Fatalf("read after the exhaustion: errno %d, err %v", errno, err)
	}
}

// failingListener fails every Accept as a process out of descriptors does.
type failingListener struct {
	net.Listener
	failed chan struct{}
}

func (l *failingListener) Accept() (net.Conn, error) {
	select {
	case l.failed <- struct{}{}:
	default:
	}
	return nil, &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", unix.EMFILE)}
}

func (l *failingListener) Close() error { return nil }

// TestCloseEndsAcceptRetryPause: Close does not wait for the accept
// loop's pause between retries to run out.
func TestCloseEndsAcceptRetryPause(t *testing.T) {
	saved := acceptBackoff
	acceptBackoff.Min, acceptBackoff.Max = time.Hour, time.Hour
	defer func() { acceptBackoff = saved }()
	s, err := New(Config{Listen: "127.0.0.1:0", Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ln := &failingListener{failed: make(chan struct{}, 1)}
	s.mu.Lock()
	s.ln = ln
	s.wg.Add(1)
	s.mu.Unlock()
	go s.accept(ln)
	<-ln.failed
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.Close(ctx); err != nil {
		t.Fatalf("Close during the accept loop's pause: %v", err)
	}
}
