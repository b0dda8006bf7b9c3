package state

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
)

// layersHistory makes random changes to an opIndex (the index as it was
// before the base on disk) and an opLayers alike.
type layersHistory struct {
	rng       *rand.Rand
	ids       []string
	rev, seq  uint64
	want      *opIndex
	got       *opLayers
	path      string
	start     time.Time
	compacted int
}

func newLayersHistory(t *testing.T, seed uint64, nids int) *layersHistory {
	h := &layersHistory{rng: rand.New(rand.NewPCG(seed, seed+1)), want: newOpIndex(), got: newOpLayers(),
		path: filepath.Join(t.TempDir(), "state-index.cache"), start: time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)}
	for n := range nids {
		var id string
		switch n % 4 {
		case 0, 1:
			id = fmt.Sprintf("op-%08x-0000-4000-8000-%012x", h.rng.Uint32(), n)
		case 2:
			id = strings.ToUpper(fmt.Sprintf("op-%08x-0000-4000-8000-%012x", h.rng.Uint32(), n))
		default:
			id = fmt.Sprintf("op-%d", h.rng.IntN(1000)*1000+n)
		}
		h.ids = append(h.ids, id)
	}
	return h
}

// op is a random operation id.
func (h *layersHistory) op(id string) commands.Operation {
	r := h.rng
	st := commands.OpStatuses[r.IntN(len(commands.OpStatuses))]
	created := h.start.Add(time.Duration(r.IntN(40)) * time.Second)
	op := commands.Operation{ID: id, Type: commands.OpTypes[r.IntN(len(commands.OpTypes))], Status: st,
		VolumeID: fmt.Sprintf("vol-%d", r.IntN(6)), CreatedAt: created, UpdatedAt: created}
	if r.IntN(3) == 0 {
		vm := fmt.Sprintf("vm-%d", r.IntN(3))
		op.VMID = &vm
	}
	if r.IntN(2) == 0 {
		op.RequestedBy = fmt.Sprintf("u%d", r.IntN(3))
	}
	if r.IntN(20) == 0 {
		op.Type = commands.OpType("by-hand")
	}
	if st.Terminal() {
		done := created.Add(time.Duration(r.IntN(90)) * time.Minute) // some past a slot's span
		op.CompletedAt = &done
	}
	return op
}

// step makes one random change to both.
func (h *layersHistory) step() {
	r := h.rng
	id := h.ids[r.IntN(len(h.ids))]
	h.rev++
	switch k := r.IntN(12); {
	case k < 6:
		op := h.op(id)
		h.want.put(h.rev, &op)
		h.got.put(h.rev, &op)
	case k < 8:
		// The watcher's put: maybe of a revision older than held.
		op := h.op(id)
		f := fieldsOf(&op)
		rev := h.rev - uint64(r.IntN(int(min(h.rev, 3)))) // revisions begin at 1
		if a, b := putNewer(h.want, id, rev, &f), putNewerLayers(h.got, id, rev, &f); a != b {
			panic(fmt.Sprintf("putNewer %s %d: %v, layers %v", id, rev, a, b))
		}
	case k < 10:
		if cur, _, live := h.want.rev(id); live {
			h.want.tombstone(id, cur)
			h.got.tombstone(id, cur)
		}
	default:
		h.want.remove(id)
		h.got.remove(id)
	}
}

// compact writes a new base from h.got as KV.saveCache does, making
// between changes while the file is synced and read back.
func (h *layersHistory) compact(t *testing.T, between int) {
	t.Helper()
	h.seq = max(h.seq, h.rev-uint64(h.rng.IntN(4)))
	x := h.got
	journal := []opChange{}
	x.journal = &journal
	tmp := h.path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var rest []opChange
	if between%2 == 1 {
		// From a copy, with changes made while it is written.
		snap := x.snapshot()
		for range between {
			h.step()
		}
		if err := writeCacheBody(f, cacheHead{stream: "KV_test", seq: h.seq}, snap, nil, nil); err != nil {
			t.Fatal(err)
		}
		rest = snap.rest(h.seq)
	} else {
		if err := writeCacheBody(f, cacheHead{stream: "KV_test", seq: h.seq}, x, nil, nil); err != nil {
			t.Fatal(err)
		}
		rest = x.rest(h.seq)
		for range between {
			h.step()
		}
	}
	if _, err := finishCacheFile(f, tmp, h.path); err != nil {
		t.Fatal(err)
	}
	c, err := readCache(h.path)
	if err != nil {
		t.Fatal(err)
	}
	c.ops.adopt(x, rest, journal)
	h.got = c.ops
	h.compacted++
}

// firstDiff is the first index where a and b differ.
func firstDiff[T comparable](a, b []T) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// nonZero drops the zero counts.
func nonZero[K comparable](m map[K]int64) map[K]int64 {
	out := maps.Clone(m)
	maps.DeleteFunc(out, func(_ K, n int64) bool { return n == 0 })
	return out
}

// check compares every answer of h.got with h.want's.
func (h *layersHistory) check(t *testing.T) {
	t.Helper()
	for _, id := range h.ids {
		r1, s1, l1 := h.want.rev(id)
		r2, s2, l2 := h.got.rev(id)
		if r1 != r2 || l1 != l2 || (l1 && s1 != s2) {
			t.Fatalf("rev %s: %d %s %v, want %d %s %v", id, r2, s2, l2, r1, s1, l1)
		}
	}
	ws, gs := h.want.stats, h.got.stats()
	if ws.Total != gs.Total || ws.Terminal != gs.Terminal || ws.TerminalDuration != gs.TerminalDuration ||
		!reflect.DeepEqual(nonZero(ws.ByType), nonZero(gs.ByType)) || !reflect.DeepEqual(nonZero(ws.ByStatus), nonZero(gs.ByStatus)) {
		t.Fatalf("stats %+v, want %+v", gs, ws)
	}
	if h.got.len() != h.want.len() {
		t.Fatalf("len %d, want %d", h.got.len(), h.want.len())
	}
	filters := []Filter{{}, {Type: commands.OpAttach}, {Type: "by-hand"}, {Status: commands.StatusCompleted},
		{VolumeID: "vol-1"}, {VMID: "vm-2"}, {RequestedBy: "u0"}, {Type: commands.OpDetach, Status: commands.StatusFailed},
		{Status: commands.StatusCompleted, VolumeID: "vol-3"}, {VMID: "vm-0", RequestedBy: "u1"}, {VolumeID: "vol-none"},
		{Type: commands.OpCreate, VolumeID: "vol-2", VMID: "vm-1"}}
	for _, f := range filters {
		for _, limit := range []int{0, 1, 7, 50} {
			// Pages follow the last hit's score and id, as
			// ListOperations' cursor does: a base slot's score is
			// compared too.
			var after *opRef
			for page := 0; ; page++ {
				wh, wm := h.want.hits(f, after, limit)
				gh, gm := h.got.hits(f, after, limit)
				if !slices.Equal(wh, gh) || wm != gm {
					t.Fatalf("hits %+v limit %d page %d: got %d (more %v), want %d (more %v); first difference at %d",
						f, limit, page, len(gh), gm, len(wh), wm, firstDiff(gh, wh))
				}
				if !wm || len(wh) == 0 {
					break
				}
				last := wh[len(wh)-1]
				after = &opRef{score: last.score, id: last.id}
			}
		}
	}
	// A cursor that is no operation's.
	after := &opRef{score: opScore(h.start.Add(20 * time.Second)), id: "op-5"}
	wi, _, _ := h.want.list(Filter{}, after, 10)
	gi, _, _ := h.got.list(Filter{}, after, 10)
	if !slices.Equal(wi, gi) {
		t.Fatalf("list after %v: %v, want %v", after, gi, wi)
	}
	held := map[string]struct{}{}
	for _, id := range h.ids[:len(h.ids)/5] {
		held[id] = struct{}{}
	}
	for _, before := range []time.Duration{10 * time.Second, 30 * time.Minute, 3 * time.Hour} {
		for _, limit := range []int{0, 1, 5, 40} {
			b := opScore(h.start.Add(before))
			wi, wr, wm := h.want.expired(b, limit, held)
			gi, gr, gm := h.got.expired(b, limit, held)
			if !slices.Equal(wi, gi) || !slices.Equal(wr, gr) || !slices.Equal(wm, gm) {
				t.Fatalf("expired before %v limit %d: got %d, want %d; first difference at %d", before, limit, len(gi), len(wi), firstDiff(gi, wi))
			}
		}
	}
}

// TestOpLayersMatchOpIndex: the base on disk and the delta in the heap
// give every answer the whole index in the heap gives (the index as it
// was before), on random histories of puts, the watcher's puts,
// tombstones and removals interleaved with new bases, some written while
// changes are made.
func TestOpLayersMatchOpIndex(t *testing.T) {
	for _, tc := range []struct {
		name                   string
		seed                   uint64
		ids, steps, every, btw int
	}{
		{"few ids, many changes", 1, 40, 3000, 300, 0},
		{"changes while writing", 2, 200, 4000, 250, 30},
		{"a base after every few", 3, 60, 600, 7, 3},
		{"many ids", 4, 2000, 8000, 1500, 100},
		{"written from a copy", 6, 300, 5000, 400, 41},
		{"no base", 5, 100, 500, 1 << 30, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newLayersHistory(t, tc.seed, tc.ids)
			for s := 1; s <= tc.steps; s++ {
				h.step()
				if s%tc.every == 0 {
					h.compact(t, tc.btw)
					h.check(t)
				}
			}
			h.check(t)
			if tc.every < tc.steps && (h.compacted == 0 || h.got.base == nil) {
				t.Fatal("no base written")
			}
			h.got.base.close()
		})
	}
}

// TestOpLayersReadersDuringSwap: listings and reads by id under the
// store's read lock while new bases are written and swapped in under its
// write lock (as KV.saveCache) see a whole index, never a closed file.
func TestOpLayersReadersDuringSwap(t *testing.T) {
	h := newLayersHistory(t, 9, 300)
	for range 1000 {
		h.step()
	}
	h.compact(t, 0)
	var mu sync.RWMutex
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for r := range 4 {
		wg.Go(func() {
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				default:
				}
				mu.RLock()
				x := h.got
				ids, _, _ := x.list(Filter{Status: commands.OpStatuses[n%len(commands.OpStatuses)]}, nil, 20)
				for _, id := range ids {
					if _, _, live := x.rev(id); !live {
						t.Errorf("reader %d: %s listed, not live", r, id)
					}
				}
				_ = x.stats()
				mu.RUnlock()
			}
		})
	}
	for range 20 {
		mu.Lock()
		for range 50 {
			h.step()
		}
		mu.Unlock()
		// Written under the read lock, swapped under the write lock.
		x := h.got
		journal := []opChange{}
		f, err := os.OpenFile(h.path+".tmp", os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		mu.RLock()
		x.journal = &journal
		h.seq = h.rev
		err = writeCacheBody(f, cacheHead{stream: "KV_test", seq: h.seq}, x, nil, nil)
		rest := x.rest(h.seq)
		mu.RUnlock()
		if err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		for range 10 {
			h.step()
		}
		mu.Unlock()
		if _, err := finishCacheFile(f, h.path+".tmp", h.path); err != nil {
			t.Fatal(err)
		}
		_ = f.Close()
		c, err := readCache(h.path)
		if err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		c.ops.adopt(x, rest, journal)
		h.got = c.ops
		mu.Unlock()
	}
	close(stop)
	wg.Wait()
	h.check(t)
	h.got.base.close()
}

// TestKVCacheV3Refused: a version 3 file cut short or with any byte
// changed is refused with an error (the start then reads every record),
// never misread nor a panic; a file left beside it by a write that
// crashed before its rename is not read.
func TestKVCacheV3Refused(t *testing.T) {
	h := newLayersHistory(t, 11, 100)
	for range 500 {
		h.step()
	}
	h.compact(t, 0)
	h.got.base.close()
	good, err := os.ReadFile(h.path)
	if err != nil {
		t.Fatal(err)
	}
	// A crash between the write and the rename leaves the temporary
	// file: the cache read is the last one renamed.
	if err := os.WriteFile(h.path+".tmp", good[:len(good)/2], 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := readCache(h.path)
	if err != nil {
		t.Fatalf("cache beside a half-written one: %v", err)
	}
	if c.ops.len() != h.want.len() {
		t.Fatalf("%d operations, want %d", c.ops.len(), h.want.len())
	}
	c.ops.base.close()
	bad := filepath.Join(t.TempDir(), "bad")
	cases := map[string][]byte{"empty": {}}
	for _, n := range []int{3, 30, 100, len(good) / 2, len(good) - 5, len(good) - 1} {
		cases[fmt.Sprintf("cut at %d", n)] = good[:n]
	}
	for _, at := range []int{40, 200, len(good) / 3, len(good) / 2, len(good) - 50, len(good) - 10, len(good) - 2} {
		b := slices.Clone(good)
		b[at] ^= 0x5a
		cases[fmt.Sprintf("byte %d changed", at)] = b
	}
	// A sound checksum over a footer that lies.
	b := slices.Clone(good)
	binary.LittleEndian.PutUint64(b[len(b)-4-8*8:], 1<<40) // its count of operations
	binary.LittleEndian.PutUint32(b[len(b)-4:], crc32.Checksum(b[:len(b)-4], kvCacheCRC))
	cases["footer with a sound checksum"] = b
	for name, raw := range cases {
		if err := os.WriteFile(bad, raw, 0o600); err != nil {
			t.Fatal(err)
		}
		if c, err := readCache(bad); err == nil {
			c.ops.base.close()
			t.Fatalf("%s: read", name)
		}
	}
}

// TestKVCacheReadsV2File: a whole cache file of version 2 (the release
// before) is read, into the heap, and gives what the index it was
// written from gives; written again as version 3, the same.
func TestKVCacheReadsV2File(t *testing.T) {
	want := goldenIndex()
	path := filepath.Join(t.TempDir(), "state-index.cache")
	var buf bytes.Buffer
	w := bufio.NewWriter(&buf)
	e := &cacheEncoder{w: w}
	e.str(kvCacheMagic)
	e.uvarint(kvCacheVersionV2)
	e.str("KV_test")
	e.varint(1)
	e.uvarint(1000)
	e.varint(time.Now().UnixNano())
	e.str("meta.cache.0")
	e.uvarint(1001)
	e.str("nonce")
	want.encode(e, 1<<62)
	encodeEntries(e, map[string]kvEntry[commands.Mapping]{}, 1<<62)
	encodeEntries(e, map[string]kvEntry[commands.Export]{}, 1<<62)
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	raw := binary.LittleEndian.AppendUint32(buf.Bytes(), crc32.Checksum(buf.Bytes(), kvCacheCRC))
	if err := os.WriteFile(path, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := readCache(path)
	if err != nil {
		t.Fatal(err)
	}
	if c.ops.base != nil || c.seq != 1000 || c.sealSeq != 1001 {
		t.Fatalf("version 2: base %v, sequence %d, seal %d", c.ops.base, c.seq, c.sealSeq)
	}
	compare := func(name string, got *opLayers) {
		t.Helper()
		for _, f := range []Filter{{}, {Status: commands.StatusFailed}, {Type: commands.OpAttach}, {VolumeID: "attach"},
			{VMID: "vm-0"}, {RequestedBy: "u1", Status: commands.StatusCompleted}} {
			ids, revs, _ := got.list(f, nil, 0)
			wids, wrevs, _ := want.list(f, nil, 0)
			if len(ids) == 0 || !slices.Equal(ids, wids) || !slices.Equal(revs, wrevs) {
				t.Fatalf("%s: list %+v: %v, want %v", name, f, ids, wids)
			}
		}
		if s := got.stats(); s.Total != want.stats.Total || s.TerminalDuration != want.stats.TerminalDuration {
			t.Fatalf("%s: stats %+v, want %+v", name, s, want.stats)
		}
	}
	compare("version 2", c.ops)
	f, err := os.OpenFile(path+".tmp", os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := writeCacheBody(f, cacheHead{stream: "KV_test", seq: 1 << 62}, c.ops, nil, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := finishCacheFile(f, path+".tmp", path); err != nil {
		t.Fatal(err)
	}
	c3, err := readCache(path)
	if err != nil {
		t.Fatal(err)
	}
	defer c3.ops.base.close()
	if c3.ops.base == nil || c3.ops.delta.len() != 0 {
		t.Fatal("version 3 not read as a base")
	}
	compare("version 3", c3.ops)
}

// TestCacheDue: the periodic cache write, a new base each time, waits
// for kvCachePending operations in the delta or a file kvCacheStale old,
// and is never written when the bucket did not change.
func TestCacheDue(t *testing.T) {
	for _, tc := range []struct {
		name    string
		changed bool
		pending int
		age     time.Duration
		due     bool
	}{
		{"unchanged", false, kvCachePending, kvCacheStale, false},
		{"a few changes", true, 10, kvCacheEvery, false},
		{"many changes", true, kvCachePending, kvCacheEvery, true},
		{"a stale file", true, 1, kvCacheStale, true},
	} {
		if got := cacheDue(tc.changed, tc.pending, tc.age); got != tc.due {
			t.Errorf("%s: due %v, want %v", tc.name, got, tc.due)
		}
	}
}

// TestOpLayersSnapshotKeepsCounters: the copy a new base is written from
// keeps its counters while the index it was taken from changes: a base
// slot replaced, removed or tombstoned after it.
func TestOpLayersSnapshotKeepsCounters(t *testing.T) {
	h := newLayersHistory(t, 13, 50)
	for range 300 {
		h.step()
	}
	h.compact(t, 0)
	defer h.got.base.close()
	snap := h.got.snapshot()
	want := snap.stats()
	for range 300 {
		h.step()
	}
	if h.got.ndead == 0 {
		t.Fatal("no base slot changed after the copy")
	}
	if got := snap.stats(); !reflect.DeepEqual(got, want) {
		t.Fatalf("the copy's counters changed: %+v, want %+v", got, want)
	}
}
