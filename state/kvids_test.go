package state

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
)

// TestOpKey: an id of volumed's form is held as its UUID's 16 bytes and
// given back the same, in the same order as the strings; any other form
// is not taken for one.
func TestOpKey(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	var ids []string
	for range 200 {
		var b [16]byte
		for i := range b {
			b[i] = byte(rng.IntN(256))
		}
		ids = append(ids, fmt.Sprintf("op-%x-%x-%x-%x-%x", b[:4], b[4:6], b[6:8], b[8:10], b[10:]))
	}
	for i, id := range ids {
		k, ok := parseOpKey(id)
		if !ok || string(appendOpID(nil, &k)) != id {
			t.Fatalf("%s: %x, %v, back %s", id, k, ok, appendOpID(nil, &k))
		}
		j := (i + 1) % len(ids)
		kj, _ := parseOpKey(ids[j])
		if got, want := bytes.Compare(k[:], kj[:]), strings.Compare(id, ids[j]); got != want {
			t.Fatalf("%s vs %s: keys %d, strings %d", id, ids[j], got, want)
		}
	}
	for _, id := range []string{"", "op-1", strings.ToUpper(ids[0]), strings.TrimPrefix(ids[0], "op-"),
		"op-" + strings.ReplaceAll(strings.TrimPrefix(ids[0], "op-"), "-", ""), ids[0][:10] + "g" + ids[0][11:],
		ids[0][:11] + "x" + ids[0][12:], ids[0] + "0", "xx-" + ids[0][3:]} {
		if k, ok := parseOpKey(id); ok {
			t.Errorf("%q taken for %x", id, k)
		}
	}
}

// TestIDTable: random adds and deletes of ids of both forms, through
// growing and shrinking, find every id held and none other, as a map
// does.
func TestIDTable(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	x := newOpIndex()
	want := map[string]uint32{}
	check := func(step int) {
		if x.byID.len() != len(want) {
			t.Fatalf("step %d: %d held, want %d", step, x.byID.len(), len(want))
		}
		for id, i := range want {
			if got, ok := x.byID.get(x, id); !ok || got != i || x.idOf(i) != id {
				t.Fatalf("step %d: %s in %d, %v; want %d", step, id, got, ok, i)
			}
		}
		for _, id := range []string{"op-none", "op-00000000-0000-4000-8000-ffffffffffff"} {
			if _, ok := x.byID.get(x, id); ok {
				t.Fatalf("step %d: an id never added is found", step)
			}
		}
	}
	for step := range 60000 {
		// Grow to a few thousand, then empty most of it, then grow again;
		// then stay near half of the smallest table, where runs wrap
		// around its end.
		add := rng.IntN(10) < 7
		switch {
		case step >= 8000 && step < 14000:
			add = rng.IntN(10) < 2
		case step >= 20000 && step < 30000:
			add = false
		case step >= 30000:
			add = len(want) < idTableMin/2-1
		}
		if add || len(want) == 0 {
			id := fmt.Sprintf("op-%d", rng.IntN(1<<20))
			if rng.IntN(2) == 0 {
				id = fmt.Sprintf("op-00000000-0000-4000-8000-%012x", rng.IntN(1<<20))
			}
			if _, ok := want[id]; ok {
				continue
			}
			i := x.alloc()
			var canon bool
			x.slots[i].key, canon = parseOpKey(id)
			if !canon {
				x.slots[i].flags = slotNamed
				x.named[i] = id
			}
			x.byID.add(x, i)
			want[id] = i
		} else {
			for id, i := range want { // a random one: map order
				x.byID.del(x, id)
				delete(want, id)
				x.slots[i] = opSlot{}
				delete(x.named, i)
				x.free = append(x.free, i)
				break
			}
		}
		if step%500 == 0 || step >= 30000 {
			check(step)
		}
	}
	if len(x.byID.cells) > 4*max(idTableMin, 2*x.byID.len()) {
		t.Fatalf("%d cells for %d ids", len(x.byID.cells), x.byID.len())
	}
}

// TestOpIndexCacheRoundTrip: an index of ids of every form (volumed's,
// uppercase, others; several created at the same instant, so that their
// ids order them), with tombstones, removed and reused slots and writes
// past the cache's revision, read back from its cache encoding lists,
// counts and finds what the index does up to that revision.
func TestOpIndexCacheRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	x := newOpIndex()
	base := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	var ids []string
	for n := range 300 {
		var id string
		switch n % 3 {
		case 0:
			id = fmt.Sprintf("op-%08x-0000-4000-8000-%012x", rng.Uint32(), n)
		case 1:
			id = strings.ToUpper(fmt.Sprintf("op-%08x-0000-4000-8000-%012x", rng.Uint32(), n))
		default:
			id = fmt.Sprintf("op-%d", rng.IntN(1000)*1000+n)
		}
		ids = append(ids, id)
	}
	put := func(rev uint64, id string) {
		st := commands.OpStatuses[rng.IntN(len(commands.OpStatuses))]
		created := base.Add(time.Duration(rng.IntN(20)) * time.Second)
		op := commands.Operation{ID: id, Type: commands.OpTypes[rng.IntN(len(commands.OpTypes))], Status: st,
			VolumeID: fmt.Sprintf("vol-%d", rng.IntN(5)), CreatedAt: created, UpdatedAt: created}
		if st.Terminal() {
			done := created.Add(time.Minute)
			op.CompletedAt = &done
		}
		x.put(rev, &op)
	}
	rev := uint64(0)
	for step := range 3000 {
		rev++
		id := ids[rng.IntN(len(ids))]
		switch r := rng.IntN(10); {
		case r < 6 || step < 300:
			put(rev, id)
		case r < 8:
			x.tombstone(id, rev)
		default:
			x.remove(id)
		}
	}
	cut := rev
	// Writes past the cache's revision are left out of it.
	for range 50 {
		rev++
		put(rev, ids[rng.IntN(len(ids))])
	}
	// What the cache must hold: x's listing, without the later writes.
	upTo := func(ids []string, revs []uint64, _ bool) ([]string, []uint64) {
		var oi []string
		var or []uint64
		for j, r := range revs {
			if r <= cut {
				oi, or = append(oi, ids[j]), append(or, r)
			}
		}
		return oi, or
	}
	byStatus := map[commands.OpStatus]int64{}
	for i := range x.ascending {
		if _, st := x.kindsOf(i); x.slots[i].rev <= cut {
			byStatus[commands.OpStatus(x.kinds.str(st))]++
		}
	}
	var buf bytes.Buffer
	w := bufio.NewWriter(&buf)
	x.encode(&cacheEncoder{w: w}, cut)
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	r := &io.LimitedReader{R: &buf, N: int64(buf.Len())}
	got, err := decodeOpIndex(&cacheDecoder{r: bufio.NewReader(r), left: r}, &kvCache{})
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []Filter{{}, {Status: commands.StatusCompleted}, {VolumeID: "vol-1"}, {Type: commands.OpAttach, VolumeID: "vol-2"}} {
		g, grevs, _ := got.list(f, nil, 0)
		w, wrevs := upTo(x.list(f, nil, 0))
		if !slices.Equal(g, w) || !slices.Equal(grevs, wrevs) {
			t.Fatalf("list %+v:\n got %v\nwant %v", f, g, w)
		}
		for _, id := range g {
			if _, ok := got.byID.get(got, id); !ok {
				t.Fatalf("%s listed, not found", id)
			}
		}
	}
	for st, n := range got.stats.ByStatus {
		if n != byStatus[st] {
			t.Fatalf("%d %s, want %d", n, st, byStatus[st])
		}
	}
	if all, _ := upTo(x.list(Filter{}, nil, 0)); got.len() != len(all) {
		t.Fatalf("%d operations, want %d", got.len(), len(all))
	}
}

// goldenIndex is the index of testdata/opindex-v2.bin (written by the
// cache encoder of main at bd3e635, cache version 2): operations of
// every kind of id, type and status, created several at an instant, some
// with times a slot holds and some it does not, a volume named as a type,
// tombstones and removed ones.
func goldenIndex() *opIndex {
	x := newOpIndex()
	base := time.Date(2026, 11, 1, 0, 0, 0, 123456789, time.UTC)
	id := func(n int) string {
		if n%17 == 0 {
			return fmt.Sprintf("op-by-hand-%d", n)
		}
		return fmt.Sprintf("op-%08x-0000-4000-8000-%012x", n*7919%1000, n)
	}
	for n := range 200 {
		created := base.Add(time.Duration(n/3) * time.Second)
		st := commands.OpStatuses[n%len(commands.OpStatuses)]
		op := commands.Operation{ID: id(n), Type: commands.OpTypes[n%len(commands.OpTypes)], Status: st,
			VolumeID: fmt.Sprintf("vol-%d", n%7), RequestedBy: fmt.Sprintf("u%d", n%3), CreatedAt: created,
			UpdatedAt: created.Add(2 * time.Second)}
		if n%5 == 0 {
			vm := fmt.Sprintf("vm-%d", n%4)
			op.VMID = &vm
		}
		if n%11 == 0 {
			op.VolumeID = string(commands.OpAttach)
		}
		if n%2 == 0 {
			done := created.Add(time.Duration(n)*time.Minute + 7)
			op.CompletedAt = &done
		}
		x.put(uint64(n+1), &op)
	}
	for n := range 200 {
		switch {
		case n%13 == 0:
			x.remove(id(n))
		case n%19 == 0:
			x.tombstone(id(n), uint64(300+n))
		}
	}
	return x
}

// TestOpIndexReadsEarlierCache: the index an earlier release wrote to its
// cache (testdata/opindex-v2.bin) loads as the index of the same
// operations this one makes: the same listings, counters and times; and
// this release's encoding of it loads the same again.
func TestOpIndexReadsEarlierCache(t *testing.T) {
	want := goldenIndex()
	raw, err := os.ReadFile("testdata/opindex-v2.bin")
	if err != nil {
		t.Fatal(err)
	}
	decode := func(raw []byte) *opIndex {
		t.Helper()
		r := &io.LimitedReader{R: bytes.NewReader(raw), N: int64(len(raw))}
		d := &cacheDecoder{r: bufio.NewReader(r), left: r}
		x, err := decodeOpIndex(d, &kvCache{})
		if err != nil || d.remaining() != 0 {
			t.Fatalf("decode: %v, %d bytes left", err, d.remaining())
		}
		return x
	}
	var buf bytes.Buffer
	w := bufio.NewWriter(&buf)
	want.encode(&cacheEncoder{w: w}, 1<<62)
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	for name, got := range map[string]*opIndex{"earlier": decode(raw), "this release's": decode(buf.Bytes())} {
		if !reflect.DeepEqual(got.stats, want.stats) {
			t.Fatalf("%s: stats %+v, want %+v", name, got.stats, want.stats)
		}
		for _, f := range []Filter{{}, {Status: commands.StatusFailed}, {Type: commands.OpAttach}, {VolumeID: "attach"},
			{VMID: "vm-0"}, {RequestedBy: "u1", Status: commands.StatusCompleted}} {
			ids, revs, _ := got.list(f, nil, 0)
			wids, wrevs, _ := want.list(f, nil, 0)
			if len(ids) == 0 || !slices.Equal(ids, wids) || !slices.Equal(revs, wrevs) {
				t.Fatalf("%s: list %+v: %v, want %v", name, f, ids, wids)
			}
		}
		for i := range want.ascending {
			j, ok := got.byID.get(got, want.idOf(i))
			if !ok {
				t.Fatalf("%s: %s missing", name, want.idOf(i))
			}
			c, d := got.times(j)
			wc, wd := want.times(i)
			if c != wc || d != wd || got.slots[j].created != want.slots[i].created {
				t.Fatalf("%s: %s: times %d %v, want %d %v", name, want.idOf(i), c, d, wc, wd)
			}
		}
	}
}
