package state

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
)

// cacheFixture is a bucket, a store without a cache that reads it (the
// reference), and the path of a cached store's file.
type cacheFixture struct {
	ctx    context.Context
	js     jetstream.JetStream
	bucket string
	plain  *KV
	path   string
	n      int // operations created
	gone   int // of them deleted
}

func newCacheFixture(ctx context.Context, t *testing.T, js jetstream.JetStream, bucket string) *cacheFixture {
	t.Helper()
	plain, err := NewKV(ctx, js, KVConfig{Bucket: bucket})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = plain.Close(context.Background()) })
	return &cacheFixture{ctx: ctx, js: js, bucket: bucket, plain: plain, path: filepath.Join(t.TempDir(), "state-index.cache")}
}

// open starts a store on the cache file, its log in logs.
func (f *cacheFixture) open(t *testing.T) (*KV, *testenv.Buffer) {
	t.Helper()
	logs := &testenv.Buffer{}
	k, err := NewKV(f.ctx, f.js, KVConfig{Bucket: f.bucket, IndexCache: f.path,
		Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k.Close(context.Background()) })
	return k, logs
}

// create records count operations through s, every third one completed.
// started records count operations, opens the store on them and waits
// for the base its start writes (count past deltaMin).
func (f *cacheFixture) started(ctx context.Context, t *testing.T, count int) *KV {
	t.Helper()
	f.create(t, f.plain, count)
	k, _ := f.open(t)
	waitFor(ctx, t, "the start's base", func() bool { return baseName(k) != "" })
	return k
}

// newCacheTest is a fixture on bucket of a new embedded server, with
// deltaMin 8 and a context of two minutes, for the test.
func newCacheTest(t *testing.T, bucket string) (context.Context, *cacheFixture) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	smallDelta(t)
	return ctx, newCacheFixture(ctx, t, testenv.StartBus(t).JetStream(), bucket)
}

// smallDelta sets deltaMin to 8 for the test, so that a few operations
// make a new base.
func smallDelta(t *testing.T) {
	old := deltaMin
	deltaMin = 8
	t.Cleanup(func() { deltaMin = old })
}

func (f *cacheFixture) create(t *testing.T, s *KV, count int) {
	t.Helper()
	for range count {
		f.n++
		vm := fmt.Sprintf("vm-%d", f.n%3)
		now := time.Now()
		op := commands.Operation{ID: fmt.Sprintf("op-%d", f.n), Type: commands.OpTypes[f.n%len(commands.OpTypes)],
			Status: commands.StatusPending, VolumeID: fmt.Sprintf("vol-%d", f.n%5), VMID: &vm, Request: json.RawMessage(`{}`),
			CreatedAt: now, UpdatedAt: now}
		if f.n%3 == 0 {
			op.Status, op.CompletedAt = commands.StatusCompleted, &now
		}
		if _, err := s.CreateOperation(f.ctx, op); err != nil {
			t.Fatal(err)
		}
	}
}

// same checks that k lists and counts what the reference does, after
// both read the bucket to its end.
func (f *cacheFixture) same(t *testing.T, k *KV) {
	t.Helper()
	for _, s := range []*KV{f.plain, k} {
		if err := s.caughtUp(f.ctx); err != nil {
			t.Fatal(err)
		}
	}
	for _, fl := range []Filter{{}, {VMID: "vm-1"}, {Type: commands.OpAttach}, {Status: commands.StatusCompleted}, {VolumeID: "vol-2", Limit: 3}} {
		g, gnext, gerr := k.ListOperations(f.ctx, fl)
		w, wnext, werr := f.plain.ListOperations(f.ctx, fl)
		if gerr != nil || werr != nil || !reflect.DeepEqual(g, w) || gnext != wnext {
			t.Fatalf("list %+v: %d (%v), want %d (%v)", fl, len(g), gerr, len(w), werr)
		}
	}
	gs, _ := k.Stats(f.ctx)
	ws, _ := f.plain.Stats(f.ctx)
	gs.Writes, ws.Writes = 0, 0
	if !reflect.DeepEqual(gs, ws) || ws.Total != int64(f.n-f.gone) {
		t.Fatalf("stats %+v, want %+v (%d operations)", gs, ws, f.n-f.gone)
	}
}

// bases lists the base files beside the cache file.
func (f *cacheFixture) bases(t *testing.T) []string {
	t.Helper()
	entries, err := os.ReadDir(filepath.Dir(f.path))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), filepath.Base(f.path)+kvBaseInfix) {
			out = append(out, e.Name())
		}
	}
	return out
}

// version reads the cache file's version.
func (f *cacheFixture) version(t *testing.T) uint64 {
	t.Helper()
	file, err := os.Open(f.path)
	if err != nil {
		t.Fatal(err)
	}
	defer file.Close()
	d := &cacheDecoder{r: bufio.NewReader(file), left: &io.LimitedReader{R: file, N: 1 << 20}}
	if d.str() != kvCacheMagic {
		t.Fatal("not a cache file")
	}
	return d.uvarint()
}

// waitFor polls until cond holds.
func waitFor(ctx context.Context, t *testing.T, what string, cond func() bool) {
	t.Helper()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("never: %s", what)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// baseName is the name of the base file k's index is on ("" none).
func baseName(k *KV) string {
	k.mu.RLock()
	defer k.mu.RUnlock()
	if k.ops.base == nil {
		return ""
	}
	return k.ops.base.ref.name
}

// twoBases records 20 operations, starts a cached store on them, copies
// its first base file to earlier (a file of that name elsewhere),
// records through it until it writes a new base, then 3 more, and stops
// it. It returns the store and the base file its cache file names (the
// stop may write a new one).
func (f *cacheFixture) twoBases(ctx context.Context, t *testing.T) (k *KV, name, earlier string) {
	t.Helper()
	k = f.started(ctx, t, 20)
	first := baseName(k)
	earlier = filepath.Join(t.TempDir(), first)
	raw, err := os.ReadFile(filepath.Join(filepath.Dir(f.path), first))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(earlier, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	f.create(t, k, 12)
	waitFor(ctx, t, "a new base", func() bool { n := baseName(k); return n != "" && n != first })
	f.create(t, k, 3)
	if err := k.Close(ctx); err != nil {
		t.Fatal(err)
	}
	return k, baseName(k), earlier
}

// TestKVCacheDeltaWrites: a cache write while no new base is due writes
// the delta into a cache file of version 4 and leaves the base file as
// it is (same inode, size and time), at a stop too; a start loads both;
// past deltaMin a new base file is written and the one before removed.
func TestKVCacheDeltaWrites(t *testing.T) {
	ctx, f := newCacheTest(t, "deltas")
	// The start reads 40 records, past deltaMin: a base file.
	k := f.started(ctx, t, 40)
	name := baseName(k)
	basePath := filepath.Join(filepath.Dir(f.path), name)
	st0, err := os.Stat(basePath)
	if err != nil {
		t.Fatal(err)
	}
	untouched := func() {
		t.Helper()
		st, err := os.Stat(basePath)
		if err != nil || !os.SameFile(st, st0) || !st.ModTime().Equal(st0.ModTime()) || st.Size() != st0.Size() {
			t.Fatalf("base file written again: %v", err)
		}
		if got := f.bases(t); !slices.Equal(got, []string{name}) {
			t.Fatalf("base files %v, want %s", got, name)
		}
	}
	for round := 1; round <= 3; round++ {
		f.create(t, k, 2)
		if err := k.caughtUp(ctx); err != nil {
			t.Fatal(err)
		}
		if err := k.saveCache(ctx); err != nil {
			t.Fatal(err)
		}
		untouched()
		c, err := readCache(f.path)
		if err != nil {
			t.Fatal(err)
		}
		if f.version(t) != kvCacheVersion || c.ops.base == nil || c.ops.base.ref.name != name || c.ops.pending() != 2*round {
			t.Fatalf("round %d: version %d, base %v, delta %d", round, f.version(t), c.ops.base, c.ops.pending())
		}
		c.ops.base.close()
	}
	f.same(t, k)
	if err := k.Close(ctx); err != nil {
		t.Fatal(err)
	}
	untouched()
	k, logs := f.open(t)
	if !strings.Contains(logs.String(), "index cache loaded") || baseName(k) != name {
		t.Fatalf("the restart did not load the cache on base %s (%s):\n%s", name, baseName(k), logs)
	}
	k.mu.RLock()
	pending := k.ops.pending()
	k.mu.RUnlock()
	if pending != 6 {
		t.Fatalf("delta of %d operations loaded, want 6", pending)
	}
	f.same(t, k)
	// Past deltaMin: a new base, the one before removed.
	f.create(t, k, 10)
	waitFor(ctx, t, "a new base", func() bool { n := baseName(k); return n != "" && n != name })
	if _, err := os.Stat(basePath); !os.IsNotExist(err) {
		t.Fatalf("the base before is still there: %v", err)
	}
	if got := f.bases(t); !slices.Equal(got, []string{baseName(k)}) {
		t.Fatalf("base files %v, want %s", got, baseName(k))
	}
	f.same(t, k)
}

// TestKVCacheDeadSlots: operations of the base updated or deleted
// since (its dead slots) are written with the delta, not with a new
// base; a start from that cache lists and counts them as the bucket
// holds them: each once, at its last revision, the deleted ones gone.
func TestKVCacheDeadSlots(t *testing.T) {
	ctx, f := newCacheTest(t, "dead")
	k := f.started(ctx, t, 40)
	name := baseName(k)
	ops, _, err := k.ListOperations(ctx, Filter{Status: commands.StatusPending, Limit: 5})
	if err != nil || len(ops) != 5 {
		t.Fatalf("list: %d, %v", len(ops), err)
	}
	// 3 executing and 2 deleted: 8 changes, not past deltaMin.
	for _, op := range ops[:3] {
		op.Status = commands.StatusExecuting
		if _, err := k.UpdateOperation(ctx, op); err != nil {
			t.Fatal(err)
		}
	}
	for _, op := range ops[3:] {
		if err := k.DeleteOperation(ctx, op.ID, op.Revision); err != nil {
			t.Fatal(err)
		}
		f.gone++
	}
	if err := k.caughtUp(ctx); err != nil {
		t.Fatal(err)
	}
	if err := k.Close(ctx); err != nil {
		t.Fatal(err)
	}
	c, err := readCache(f.path)
	if err != nil {
		t.Fatal(err)
	}
	c.ops.base.close()
	if c.ops.base.ref.name != name || c.ops.ndead != 5 || c.ops.pending() != 3 {
		t.Fatalf("cache file on base %s, %d dead, delta %d; want %s, 5, 3", c.ops.base.ref.name, c.ops.ndead, c.ops.pending(), name)
	}
	k, logs := f.open(t)
	if !strings.Contains(logs.String(), "index cache loaded") || baseName(k) != name {
		t.Fatalf("the restart did not load the cache on base %s (%s):\n%s", name, baseName(k), logs)
	}
	f.same(t, k)
	// A dead slot past the base's 40 is refused.
	other := filepath.Join(t.TempDir(), filepath.Base(f.path))
	if err := os.Link(filepath.Join(filepath.Dir(f.path), name), filepath.Join(filepath.Dir(other), name)); err != nil {
		t.Fatal(err)
	}
	c.ops.dead[0] |= 1 << 40
	h := cacheHead{stream: c.stream, created: c.created.UnixNano(), seq: c.seq, written: c.written.UnixNano(),
		sealKey: c.sealKey, sealSeq: c.sealSeq, nonce: c.sealNonce}
	if err := writeCacheFile(other, encodeCache(h, c.ops.base.ref, c.ops, nil, nil)); err != nil {
		t.Fatal(err)
	}
	if c, err := readCache(other); err == nil || !strings.Contains(err.Error(), "dead slots past the base") {
		if err == nil {
			c.ops.base.close()
		}
		t.Fatalf("a dead slot past the base read: %v", err)
	}
}

// TestKVCacheNewerVersionRefused: a cache file of a version this release
// does not know (as version 4 is to the release before) is refused
// before anything else of it is read: the start reads every record and
// lists what the bucket holds, and the base files beside it are removed.
func TestKVCacheNewerVersionRefused(t *testing.T) {
	ctx, f := newCacheTest(t, "newer")
	f.twoBases(ctx, t)
	raw, err := os.ReadFile(f.path)
	if err != nil {
		t.Fatal(err)
	}
	at := 1 + len(kvCacheMagic) // the magic's length, a byte, then the magic
	if raw[at] != kvCacheVersion {
		t.Fatalf("version byte %d", raw[at])
	}
	raw[at] = kvCacheVersion + 1
	if err := os.WriteFile(f.path, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	k, logs := f.open(t)
	if want := fmt.Sprintf("version %d, not %d", kvCacheVersion+1, kvCacheVersion); !strings.Contains(logs.String(), "index cache not used: reading every record") ||
		!strings.Contains(logs.String(), want) {
		t.Fatalf("newer cache file not refused (%s):\n%s", want, logs)
	}
	f.same(t, k)
	waitFor(ctx, t, "a new base, the one before removed", func() bool {
		n := baseName(k)
		return n != "" && slices.Equal(f.bases(t), []string{n})
	})
	f.same(t, k)
}

// TestKVCacheBaseRefused: a cache file whose base file is missing, cut,
// corrupt or another is refused: the start reads every record, lists
// what the bucket holds, and writes a new base.
func TestKVCacheBaseRefused(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	smallDelta(t)
	js := testenv.StartBus(t).JetStream()
	for _, tc := range []struct {
		name  string
		fault func(t *testing.T, base, earlier string)
	}{
		{"missing", func(t *testing.T, base, _ string) {
			if err := os.Remove(base); err != nil {
				t.Fatal(err)
			}
		}},
		{"cut", func(t *testing.T, base, _ string) {
			st, err := os.Stat(base)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(base, st.Size()-1); err != nil {
				t.Fatal(err)
			}
		}},
		{"corrupt", func(t *testing.T, base, _ string) {
			raw, err := os.ReadFile(base)
			if err != nil {
				t.Fatal(err)
			}
			raw[len(raw)/2] ^= 0xff
			if err := os.WriteFile(base, raw, 0o600); err != nil {
				t.Fatal(err)
			}
		}},
		{"another", func(t *testing.T, base, earlier string) {
			// The base before the last, a whole file of fewer operations.
			if err := os.Rename(earlier, base); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newCacheFixture(ctx, t, js, "refused-"+tc.name)
			k, name, earlier := f.twoBases(ctx, t)
			if c, err := readCache(f.path); err != nil || c.ops.base.ref.name != name {
				t.Fatalf("cache file on %v (%v), want %s", c, err, name)
			} else {
				c.ops.base.close()
			}
			tc.fault(t, filepath.Join(filepath.Dir(f.path), name), earlier)
			k, logs := f.open(t)
			if !strings.Contains(logs.String(), "index cache not used: reading every record") {
				t.Fatalf("cache used on a %s base:\n%s", tc.name, logs)
			}
			f.same(t, k)
			waitFor(ctx, t, "a new base", func() bool { n := baseName(k); return n != "" && n != name })
			if got := f.bases(t); !slices.Equal(got, []string{baseName(k)}) {
				t.Fatalf("base files %v, want %s", got, baseName(k))
			}
		})
	}
}

// TestKVCacheCrashLeftovers: what a crash leaves in the middle of a
// cache write with a new base (a new base file no cache file names yet,
// its temporary file, a temporary cache file; or the base file before
// the one the cache file names, not yet removed) does not stop a start
// from the cache, and is removed.
func TestKVCacheCrashLeftovers(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	smallDelta(t)
	js := testenv.StartBus(t).JetStream()
	for _, tc := range []struct {
		name  string
		crash func(t *testing.T, f *cacheFixture, k *KV, earlier string) []string
	}{
		{"base written, cache not renamed", func(t *testing.T, f *cacheFixture, k *KV, _ string) []string {
			k.mu.RLock()
			ref, err := writeBaseFile(f.path, k.ops, k.seen)
			k.mu.RUnlock()
			if err != nil {
				t.Fatal(err)
			}
			tmp := f.path + kvBaseInfix + "99.0badc0de.tmp"
			for _, p := range []string{tmp, f.path + ".tmp"} {
				if err := os.WriteFile(p, []byte("half a file"), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			return []string{ref.name, filepath.Base(tmp)}
		}},
		{"cache renamed, base before not removed", func(t *testing.T, f *cacheFixture, _ *KV, earlier string) []string {
			name := filepath.Base(earlier)
			if err := os.Rename(earlier, filepath.Join(filepath.Dir(f.path), name)); err != nil {
				t.Fatal(err)
			}
			return []string{name}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newCacheFixture(ctx, t, js, fmt.Sprintf("crash-%d", len(tc.name)))
			k, name, earlier := f.twoBases(ctx, t)
			left := tc.crash(t, f, k, earlier)
			if got := f.bases(t); len(got) != 1+len(left) {
				t.Fatalf("base files %v, want %s and %v", got, name, left)
			}
			k, logs := f.open(t)
			if !strings.Contains(logs.String(), "index cache loaded") || baseName(k) != name {
				t.Fatalf("the cache on %s was not loaded (%s):\n%s", name, baseName(k), logs)
			}
			if got := f.bases(t); !slices.Equal(got, []string{name}) {
				t.Fatalf("base files %v, want %s alone", got, name)
			}
			f.same(t, k)
		})
	}
}

// TestKVCacheReadsV3File: a cache file of version 3 (the base inside it,
// the release before) is loaded, not refused, and written as version 4
// with a base file at once; the base files it does not name are removed.
func TestKVCacheReadsV3File(t *testing.T) {
	ctx, f := newCacheTest(t, "v3")
	k := f.started(ctx, t, 20)
	f.create(t, k, 3)
	if err := k.Close(ctx); err != nil {
		t.Fatal(err)
	}
	name := baseName(k)
	// The same index as the release before wrote it.
	c, err := readCache(f.path)
	if err != nil {
		t.Fatal(err)
	}
	tmp := f.path + ".tmp"
	file, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer file.Close()
	h := cacheHead{stream: c.stream, created: c.created.UnixNano(), seq: c.seq, written: c.written.UnixNano(),
		sealKey: c.sealKey, sealSeq: c.sealSeq, nonce: c.sealNonce}
	if err := writeCacheBody(file, h, c.ops, c.mappings, c.exports); err != nil {
		t.Fatal(err)
	}
	if _, err := finishCacheFile(file, tmp, f.path); err != nil {
		t.Fatal(err)
	}
	c.ops.base.close()
	if v := f.version(t); v != kvCacheVersionV3 {
		t.Fatalf("version %d written", v)
	}
	k, logs := f.open(t)
	if !strings.Contains(logs.String(), "index cache loaded") {
		t.Fatalf("version 3 file not loaded:\n%s", logs)
	}
	f.same(t, k)
	waitFor(ctx, t, "a version 4 file on a base file", func() bool {
		n := baseName(k)
		return n != "" && n != name && f.version(t) == kvCacheVersion && slices.Equal(f.bases(t), []string{n})
	})
	f.same(t, k)
	if err := k.Close(ctx); err != nil {
		t.Fatal(err)
	}
	k, logs = f.open(t)
	if !strings.Contains(logs.String(), "index cache loaded") {
		t.Fatalf("version 4 file written from version 3 not loaded:\n%s", logs)
	}
	f.same(t, k)
}
