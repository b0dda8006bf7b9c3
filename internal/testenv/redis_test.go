package testenv

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"
)

// TestFreePortClaimed: a port FreePort gives stays claimed against the
// other test processes (a lock taken on another open of its file, as
// another process's would be, is refused), and a port another process
// claims is not given.
func TestFreePortClaimed(t *testing.T) {
	p := FreePort(t)
	f, err := os.Open(filepath.Join(os.TempDir(), "volumed-test-ports", strconv.Itoa(p)))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); !errors.Is(err, unix.EWOULDBLOCK) {
		t.Fatalf("port %d given, and a second lock on it: %v, want EWOULDBLOCK", p, err)
	}
	ports.mu.Lock()
	delete(ports.given, p) // as if another process held it
	ok := claimPort(p)
	ports.mu.Unlock()
	if ok {
		t.Fatalf("port %d claimed twice", p)
	}
}
