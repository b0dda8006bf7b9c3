package state

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
)

// BenchOpIndex measures the operation index alone on the n operations
// h.Op(0), …, h.Op(n-1), created in that order (BenchmarkOpIndexHistory).
func BenchOpIndex(b *testing.B, n int, h interface {
	Op(i int) commands.Operation
	Created(i int) time.Time
	ID(i int) string
}) {
	heap := func() int64 {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return int64(ms.HeapAlloc)
	}
	for b.Loop() {
		ops := make([]opFields[[]byte], n)
		for i := range ops {
			op := h.Op(i)
			f := fieldsOf(&op)
			ops[i] = opFields[[]byte]{typ: []byte(f.typ), status: []byte(f.status), volume: []byte(f.volume),
				vm: []byte(f.vm), by: []byte(f.by), created: f.created, completed: f.completed, duration: f.duration}
		}
		base := heap()
		// As the first read makes it: the watcher's puts, then the lists.
		began := time.Now()
		x := newOpIndex()
		x.grow(n)
		x.deferred = true
		for i := range ops {
			putNewer(x, h.ID(i), uint64(i+1), &ops[i])
		}
		x.endDeferred()
		built := time.Since(began)
		read := heap() - base // ops is in base
		runtime.KeepAlive(ops)
		b.Logf("%d operations: heap %.1f MB as read into the heap (in %v)", n, float64(read)/1e6, built.Round(time.Millisecond))
		benchIndexLists(b, "heap", x, h, n)
		// Written as a base on disk, and read back as a start does.
		path := filepath.Join(b.TempDir(), "state-index.cache")
		layers := newOpLayers()
		layers.delta = x
		began = time.Now()
		f, err := os.OpenFile(path+".tmp", os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			b.Fatal(err)
		}
		if err := writeCacheBody(f, cacheHead{stream: "KV_bench", seq: uint64(n)}, layers, nil, nil); err != nil {
			b.Fatal(err)
		}
		if _, err := finishCacheFile(f, path+".tmp", path); err != nil {
			b.Fatal(err)
		}
		_ = f.Close()
		written := time.Since(began)
		st, err := os.Stat(path)
		if err != nil {
			b.Fatal(err)
		}
		x, layers = nil, nil
		base = heap()
		began = time.Now()
		c, err := readCache(path)
		if err != nil {
			b.Fatal(err)
		}
		took := time.Since(began)
		loaded := heap() - base
		b.ReportMetric(float64(read)/float64(n), "read-B/op")
		b.ReportMetric(float64(loaded)/float64(n), "loaded-B/op")
		b.Logf("%d operations: heap %.2f MB as loaded from its base on disk (%.1f MB file, written in %v, read in %v)",
			n, float64(loaded)/1e6, float64(st.Size())/1e6, written.Round(time.Millisecond), took.Round(time.Millisecond))
		benchIndexLists(b, "base", c.ops, h, n)
		// With a delta in front of it: the last 1 % written again.
		for i := n - n/100; i < n; i++ {
			op := h.Op(i)
			c.ops.put(uint64(n+i+1), &op)
		}
		benchIndexLists(b, "base+delta", c.ops, h, n)
		c.ops.base.close()
	}
}

// benchIndexLists logs the p50 and p99 of listing pages of 50 on x.
func benchIndexLists(b *testing.B, what string, x interface {
	list(f Filter, after *opRef, limit int) ([]string, []uint64, bool)
}, h interface {
	Op(i int) commands.Operation
	Created(i int) time.Time
	ID(i int) string
}, n int) {
	rng := rand.New(rand.NewPCG(1, 2))
	pick := func(keep func(commands.Operation) bool) commands.Operation {
		for {
			if op := h.Op(rng.IntN(n)); keep(op) {
				return op
			}
		}
	}
	all := func(commands.Operation) bool { return true }
	onVM := func(op commands.Operation) bool { return op.VMID != nil }
	status := func(st commands.OpStatus) func(commands.Operation) bool {
		return func(op commands.Operation) bool { return op.Status == st }
	}
	for _, q := range []struct {
		name   string
		filter func() Filter
	}{
		{"none", func() Filter { return Filter{} }},
		{"type", func() Filter { return Filter{Type: pick(all).Type} }},
		{"status", func() Filter {
			return Filter{Status: []commands.OpStatus{commands.StatusCompleted, commands.StatusFailed}[rng.IntN(2)]}
		}},
		{"volume", func() Filter { return Filter{VolumeID: pick(all).VolumeID} }},
		{"vm", func() Filter { op := pick(onVM); return Filter{VMID: op.VM()} }},
		{"requested_by", func() Filter { return Filter{RequestedBy: pick(all).RequestedBy} }},
		{"type+status", func() Filter {
			op := pick(status(commands.StatusFailed))
			return Filter{Type: op.Type, Status: op.Status}
		}},
		{"status+volume", func() Filter {
			op := pick(status(commands.StatusCompleted))
			return Filter{Status: op.Status, VolumeID: op.VolumeID}
		}},
		{"type+vm", func() Filter { op := pick(onVM); return Filter{Type: op.Type, VMID: op.VM()} }},
		{"vm+requested_by", func() Filter { op := pick(onVM); return Filter{VMID: op.VM(), RequestedBy: op.RequestedBy} }},
	} {
		for _, deep := range []bool{false, true} {
			const samples = 1000
			lat := make([]time.Duration, 0, samples)
			for range samples {
				f := q.filter()
				var after *opRef
				if deep {
					i := n/4 + rng.IntN(n/4)
					after = &opRef{score: opScore(h.Created(i)), id: h.ID(i)}
				}
				began := time.Now()
				ids, _, _ := x.list(f, after, 50)
				lat = append(lat, time.Since(began))
				if len(ids) == 0 {
					b.Fatalf("%s %+v: empty page", q.name, f)
				}
			}
			slices.Sort(lat)
			b.Logf("%-10s list %-16s deep %-5v p50 %7.3f ms  p99 %7.3f ms", what, q.name, deep,
				float64(lat[samples/2])/1e6, float64(lat[samples*99/100])/1e6)
		}
	}
}
