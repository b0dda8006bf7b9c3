package nbd

import (
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/volumed/volumed/internal/testenv"
)

// TestFloodStaysBounded is the hostile client of issue 12: 8 connections
// each send 8 reads of 32 MiB (14 KB in all) and never read a reply. The
// server's heap grows by no more than the global budget
// (DefaultMaxBytesInFlight, 128 MiB) plus slack, where it used to grow by
// the 2 GiB asked for; meanwhile nbdcopy still reads the same export
// completely and correctly, and a client of another export is served.
func TestFloodStaysBounded(t *testing.T) {
	requireTools(t, "nbdcopy", "nbdinfo")
	data := pattern(64*mib, 5)
	s := startServer(t)
	setExports(t, s, ExportSpec{Name: "vol00000001", Path: backingFile(t, "vol.img", data)},
		ExportSpec{Name: "vol00000002", Path: backingFile(t, "other.img", make([]byte, mib))})

	before := heapInuse()
	rssBefore := rss(t)
	for i := range 8 {
		c := dialPipe(t, s.Addr(), "vol00000001", i%2 == 1) // simple and structured
		for j := range 8 {
			if err := c.send(cmdRead, 0, uint64(j), 0, maxPayload, nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Every flooding connection holds its per-connection share: the global
	// budget is full.
	testenv.Eventually(t, 20*time.Second, func() bool {
		s.budget.mu.Lock()
		defer s.budget.mu.Unlock()
		return s.budget.used == DefaultMaxBytesInFlight
	}, "the flood never filled the budget")
	grown := int64(heapInuse()) - int64(before)
	t.Logf("flooded: heap +%d MiB, RSS %d → %d MiB", grown>>20, rssBefore>>20, rss(t)>>20)
	const slack = 32 * mib
	if grown > DefaultMaxBytesInFlight+slack {
		t.Fatalf("heap grew by %d MiB under the flood, over the %d MiB bound", grown>>20, (DefaultMaxBytesInFlight+slack)>>20)
	}

	dst := filepath.Join(t.TempDir(), "copy.img")
	mustRun(t, "nbdcopy", uri(s, "vol00000001"), dst)
	fileEquals(t, dst, data)
	if got := nbdinfo(t, uri(s, "vol00000002")); len(got) != 1 || got[0].Size != mib {
		t.Fatalf("other export: %+v", got)
	}
	if grown := int64(heapInuse()) - int64(before); grown > DefaultMaxBytesInFlight+DefaultMaxConns*chunkSize+slack {
		t.Fatalf("heap grew by %d MiB with the flood and other clients", grown>>20)
	}
}

// heapInuse is the heap in use after a collection.
func heapInuse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}

// rss is this process's resident set size.
func rss(t *testing.T) int64 {
	raw, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for l := range strings.Lines(string(raw)) {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb << 10
		}
	}
	return 0
}
