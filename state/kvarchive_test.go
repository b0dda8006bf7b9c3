package state

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
)

// archiveFixture is a cache fixture whose stores keep an archive, and
// counts the records they read from the bucket by key.
type archiveFixture struct {
	*cacheFixture
	dir  string
	gets atomic.Int64
	logs testenv.Buffer // of the stores open opens
}

func newArchiveTest(t *testing.T) (context.Context, *archiveFixture) {
	ctx, f := newCacheTest(t, fmt.Sprintf("archive_%d", time.Now().UnixNano()))
	return ctx, &archiveFixture{cacheFixture: f, dir: filepath.Join(t.TempDir(), "ops-archive")}
}

// open starts a store on the cache file (cache) and the archive.
func (f *archiveFixture) open(t *testing.T, cache bool) *KV {
	t.Helper()
	cfg := KVConfig{Bucket: f.bucket, Archive: f.dir, Logger: slog.New(slog.NewTextHandler(&f.logs, nil))}
	if cache {
		cfg.IndexCache = f.path
	}
	k, err := NewKV(f.ctx, f.js, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k.Close(context.Background()) })
	k.onGet = func(string) { f.gets.Add(1) }
	return k
}

// terminal records through s an operation ended at ended, failed (so
// that it can be annotated), on a volume of its own.
func (f *archiveFixture) terminal(t *testing.T, s *KV, ended time.Time) commands.Operation {
	t.Helper()
	f.n++
	vm := "vm-1"
	op := commands.Operation{ID: fmt.Sprintf("op-%d", f.n), Type: commands.OpAttach, Status: commands.StatusFailed,
		VolumeID: fmt.Sprintf("vol-%d", f.n), VMID: &vm, Request: json.RawMessage(`{"n":1}`), Error: "no", CreatedAt: ended.Add(-time.Second),
		UpdatedAt: ended, CompletedAt: &ended}
	op, err := s.CreateOperation(f.ctx, op)
	if err != nil {
		t.Fatal(err)
	}
	return op
}

// check reads want by id, then through a listing's read, gets of them
// from the bucket, and compares them with want.
func (f *archiveFixture) check(t *testing.T, k *KV, want commands.Operation, gets int64) {
	t.Helper()
	if err := k.caughtUp(f.ctx); err != nil { // a read by id waits for the watcher only briefly
		t.Fatal(err)
	}
	before := f.gets.Load()
	got, err := k.GetOperation(f.ctx, want.ID)
	if err != nil {
		t.Fatal(err)
	}
	listed := make([]commands.Operation, 1)
	if err := k.getOps(f.ctx, []string{want.ID}, []uint64{want.Revision}, []int{0}, listed); err != nil {
		t.Fatal(err)
	}
	for _, g := range []commands.Operation{got, listed[0]} {
		a, _ := json.Marshal(g)
		b, _ := json.Marshal(want)
		if string(a) != string(b) || g.Revision != want.Revision {
			t.Fatalf("read %s at %d, want %s at %d", a, g.Revision, b, want.Revision)
		}
	}
	if n := f.gets.Load() - before; n != gets {
		t.Fatalf("%s: %d reads from the bucket, want %d", want.ID, n, gets)
	}
}

// TestKVArchiveReads: a terminal record is read from the archive, by id
// and for a listing, by the store that wrote it, by one that read it
// from the bucket at its start, and after a restart on the cache file;
// a record the archive does not hold whole, or holds at another
// revision, is read from the bucket, once: that read archives it.
func TestKVArchiveReads(t *testing.T) {
	ctx, f := newArchiveTest(t)
	k := f.open(t, true)
	old := f.terminal(t, k, time.Now().Add(-48*time.Hour))
	f.check(t, k, old, 0)
	now := time.Now()
	vm := "vm-1"
	pending, err := k.CreateOperation(ctx, commands.Operation{ID: "pending", Type: commands.OpAttach, Status: commands.StatusPending,
		VolumeID: "vol-1", VMID: &vm, CreatedAt: now, UpdatedAt: now})
	if err != nil {
		t.Fatal(err)
	}
	f.check(t, k, pending, 2)
	// Another process's write, seen by the watcher.
	other := f.terminal(t, f.plain, time.Now())
	archivedBy(ctx, t, k, other)
	f.check(t, k, other, 0)

	// Rewritten (annotated) by another process: the new revision.
	first := other
	other.Details = map[string]any{"note": "later"}
	if other, err = f.plain.UpdateOperation(ctx, other); err != nil {
		t.Fatal(err)
	}
	archivedBy(ctx, t, k, other)
	f.check(t, k, other, 0)

	// A restart on the cache file: the index holds them without reading
	// them again, the archive still serves them.
	if err := k.Close(ctx); err != nil {
		t.Fatal(err)
	}
	k = f.open(t, true)
	f.check(t, k, old, 0)
	f.check(t, k, other, 0)

	// A start reading every record archives none twice.
	seg := filepath.Join(f.dir, segName(uint32(old.CompletedAt.Unix()/86400)))
	size := fileSize(t, seg)
	k2 := f.open(t, false)
	f.check(t, k2, old, 0)
	if s := fileSize(t, seg); s != size {
		t.Fatalf("segment grew from %d to %d bytes at a start reading every record", size, s)
	}
	if err := k2.Close(ctx); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name  string
		spoil func(t *testing.T, seg, m string, op commands.Operation) commands.Operation
	}{
		{"place of another record", func(t *testing.T, _, _ string, op commands.Operation) commands.Operation {
			samePlace(t, f.dir, op.Revision, old.Revision)
			return op
		}},
		{"place of its earlier revision", func(t *testing.T, _, _ string, _ commands.Operation) commands.Operation {
			samePlace(t, f.dir, other.Revision, first.Revision)
			return other
		}},
		{"bit flipped", func(t *testing.T, seg, _ string, op commands.Operation) commands.Operation {
			b, err := os.ReadFile(seg)
			if err != nil {
				t.Fatal(err)
			}
			b[bytes.Index(b, []byte(`"no"`))+1] = 'N' // still JSON
			writeFile(t, seg, b)
			return op
		}},
		{"truncated", func(t *testing.T, seg, _ string, op commands.Operation) commands.Operation {
			if err := os.Truncate(seg, fileSize(t, seg)-5); err != nil {
				t.Fatal(err)
			}
			return op
		}},
		{"segment removed", func(t *testing.T, seg, _ string, op commands.Operation) commands.Operation {
			removeFile(t, seg)
			return op
		}},
		{"map removed", func(t *testing.T, _, m string, op commands.Operation) commands.Operation {
			removeFile(t, m)
			return op
		}},
		{"map zeroed", func(t *testing.T, _, m string, op commands.Operation) commands.Operation {
			writeFile(t, m, make([]byte, fileSize(t, m)))
			return op
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			op := f.terminal(t, k, time.Now().Add(-time.Duration(f.n)*24*time.Hour))
			f.check(t, k, op, 0)
			spoilt := tc.spoil(t, filepath.Join(f.dir, segName(uint32(op.CompletedAt.Unix()/86400))), filepath.Join(f.dir, mapName(op.Revision)), op)
			k.archive.mu.Lock()
			k.archive.closeFiles() // so that they are read as they are now
			k.archive.mu.Unlock()
			f.check(t, k, spoilt, 1) // the read by id archives it again
		})
	}
}

// TestKVArchiveStart: a store started on a cache file written without
// an archive (by a release before it) reads a record it holds from the
// bucket once, and archives those written since; an archive kept for
// another bucket is emptied.
func TestKVArchiveStart(t *testing.T) {
	ctx, f := newArchiveTest(t)
	old := f.unarchived(t, 1)[0]
	k := f.open(t, true)
	f.check(t, k, old, 1)
	later := f.terminal(t, k, time.Now())
	f.check(t, k, later, 0)
	if err := k.Close(ctx); err != nil {
		t.Fatal(err)
	}

	// The same directory for another bucket.
	g := &archiveFixture{cacheFixture: newCacheFixture(ctx, t, f.js, f.bucket+"_other"), dir: f.dir}
	k = g.open(t, false)
	if n := len(archiveFiles(t, f.dir)); n != 0 {
		t.Fatalf("%d files of another bucket's archive kept", n)
	}
	g.check(t, k, g.terminal(t, k, time.Now()), 0)
}

// TestKVArchivePrune: the retention removes the segments of the days
// before its cut (less a day) with the operations, and keeps the others.
func TestKVArchivePrune(t *testing.T) {
	ctx, f := newArchiveTest(t)
	k := f.open(t, false)
	old := f.terminal(t, k, time.Now().Add(-40*24*time.Hour))
	edge := f.terminal(t, k, time.Now().Add(-30*24*time.Hour-time.Hour))
	recent := f.terminal(t, k, time.Now())
	files := archiveFiles(t, f.dir)
	n := len(files)
	cut := time.Now().Add(-30 * 24 * time.Hour)
	if _, err := k.PruneOperations(ctx, cut, 0); err != nil {
		t.Fatal(err)
	}
	if left := archiveFiles(t, f.dir); !reflect.DeepEqual(left, files) {
		t.Fatalf("archive after the retention's deletions: %v, want %v (each instance prunes its own: PruneLocal)", left, files)
	}
	k.PruneLocal(cut)
	left := archiveFiles(t, f.dir)
	want := slices.DeleteFunc(files, func(n string) bool { return n == segName(uint32(old.CompletedAt.Unix()/86400)) })
	if !reflect.DeepEqual(left, want) || n != 4 {
		t.Fatalf("archive after the retention: %v, want %v", left, want)
	}
	if _, err := k.GetOperation(ctx, old.ID); !errors.Is(err, ErrNotFound) {
		t.Fatalf("pruned operation read: %v", err)
	}
	f.check(t, k, recent, 0)
	_ = edge // pruned, its day's segment kept (the margin)
}

// TestKVCloseClosesFiles: Close closes the archive's files (not the
// index's base file: TestKVReadsAfterClose).
func TestKVCloseClosesFiles(t *testing.T) {
	ctx, f := newArchiveTest(t)
	k := f.open(t, true)
	f.check(t, k, f.terminal(t, k, time.Now()), 0)
	k.archive.mu.Lock()
	files := make([]*os.File, 0, len(k.archive.files))
	for _, fl := range k.archive.files {
		files = append(files, fl)
	}
	k.archive.mu.Unlock()
	if len(files) == 0 {
		t.Fatal("no archive file open")
	}
	if err := k.Close(ctx); err != nil {
		t.Fatal(err)
	}
	for _, fl := range files {
		if _, err := fl.Stat(); !errors.Is(err, os.ErrClosed) {
			t.Fatalf("%s open after Close: %v", fl.Name(), err)
		}
	}
}

// TestArchiveRevisionReused archives another record at a revision that
// has an entry (a stream restored from an earlier backup, which keeps its
// name and creation time, writes its next revisions again): the entry is
// the new record, not the one of the history the restore dropped.
// A start on a stream that ends before an entry (restored) drops it,
// so that no read finds it before the revision's new record is archived.
func TestArchiveRevisionReused(t *testing.T) {
	dir := t.TempDir()
	open := func(last uint64) *opArchive {
		a, err := openArchive(dir, "KV_x", time.Unix(1, 0), last, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	a := open(0)
	ended := time.Now().UnixMicro()
	a.put("op-1", 7, ended, []byte(`{"status":"completed"}`), true)
	a.put("op-1", 7, ended, []byte(`{"status":"failed"}`), true)
	if got, err := a.get("op-1", 7); err != nil || string(got) != `{"status":"failed"}` {
		t.Fatalf("get: %s, %v; want the later record", got, err)
	}
	a.put("op-2", 5, ended, []byte(`{}`), true)
	a.put("op-3", 3<<kvArchiveMapShift, ended, []byte(`{}`), true)
	a.close()
	a = open(6)
	defer a.close()
	for _, e := range []struct {
		id   string
		rev  uint64
		want error
	}{{"op-2", 5, nil}, {"op-1", 7, errArchiveMiss}, {"op-3", 3 << kvArchiveMapShift, errArchiveMiss}} {
		if _, err := a.get(e.id, e.rev); !errors.Is(err, e.want) {
			t.Errorf("after a start at revision 6: get %s at %d: %v, want %v", e.id, e.rev, err, e.want)
		}
	}
}

// unarchived records n operations ended now through a store without an
// archive that keeps the cache file, as a release before the archive
// did, and stops it: a store started on the file holds them in its
// index, and not in its archive.
func (f *archiveFixture) unarchived(t *testing.T, n int) []commands.Operation {
	t.Helper()
	before, err := NewKV(f.ctx, f.js, KVConfig{Bucket: f.bucket, IndexCache: f.path})
	if err != nil {
		t.Fatal(err)
	}
	ops := make([]commands.Operation, n)
	for i := range ops {
		ops[i] = f.terminal(t, before, time.Now())
	}
	if err := before.Close(f.ctx); err != nil {
		t.Fatal(err)
	}
	// As if the archive had lost them: no backfill archives them.
	info, err := before.stream.Info(f.ctx)
	if err != nil {
		t.Fatal(err)
	}
	a, err := openArchive(f.dir, info.Config.Name, info.Created, info.State.LastSeq, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if err := a.setThrough(info.State.LastSeq); err != nil {
		t.Fatal(err)
	}
	return ops
}

// TestKVArchiveReadThrough: a record the index holds ended at the
// revision the bucket holds, but the archive does not (taken from a
// cache file written without an archive: an upgrade's first start), is
// read from the bucket once, by id or by a listing, which archives it as
// the bucket holds it; the next reads, by id and by a listing, are the
// archive's, also after reads of it at once.
func TestKVArchiveReadThrough(t *testing.T) {
	ctx, f := newArchiveTest(t)
	ops := f.unarchived(t, 3)
	k := f.open(t, true)
	byID := func(op commands.Operation) (commands.Operation, error) { return k.GetOperation(ctx, op.ID) }
	for i, tc := range []struct {
		name    string
		readers int
		read    func(commands.Operation) (commands.Operation, error)
	}{
		{"by id", 1, byID},
		{"listing", 1, func(op commands.Operation) (commands.Operation, error) {
			got, _, err := k.ListOperations(ctx, Filter{VolumeID: op.VolumeID, Limit: 10})
			if err == nil && len(got) != 1 {
				err = fmt.Errorf("listed %d operations, want 1", len(got))
			}
			if err != nil {
				return commands.Operation{}, err
			}
			return got[0], nil
		}},
		{"by id at once", 8, byID},
	} {
		t.Run(tc.name, func(t *testing.T) {
			op := ops[i]
			if _, err := k.archive.get(op.ID, op.Revision); !errors.Is(err, errArchiveMiss) {
				t.Fatalf("archived before a read: %v", err)
			}
			stored, err := k.last(ctx, kvOpPrefix+op.ID)
			if err != nil {
				t.Fatal(err)
			}
			seg := filepath.Join(f.dir, segName(uint32(op.CompletedAt.Unix()/86400)))
			size := archivedSize(t, seg)
			if err := k.caughtUp(ctx); err != nil {
				t.Fatal(err)
			}
			before := f.gets.Load()
			count := k.onGet
			var arrived sync.WaitGroup // the readers read the bucket at once
			arrived.Add(tc.readers)
			k.onGet = func(key string) { count(key); arrived.Done(); arrived.Wait() }
			errs := make(chan error, tc.readers)
			for range tc.readers {
				go func() {
					got, err := tc.read(op)
					if err == nil && got.Revision != op.Revision {
						err = fmt.Errorf("read revision %d, want %d", got.Revision, op.Revision)
					}
					errs <- err
				}()
			}
			for range tc.readers {
				if err := <-errs; err != nil {
					t.Fatal(err)
				}
			}
			k.onGet = count
			if n := f.gets.Load() - before; n != int64(tc.readers) {
				t.Fatalf("%d reads from the bucket, want %d", n, tc.readers)
			}
			if raw, err := k.archive.get(op.ID, op.Revision); err != nil || !bytes.Equal(raw, stored.data) {
				t.Fatalf("archive after a read from the bucket: %q, %v; want %q", raw, err, stored.data)
			}
			// Readers at once may each append it (the map holds the last).
			if grown, entry := archivedSize(t, seg)-size, int64(kvArchiveHead+len(op.ID)+len(stored.data)); grown%entry != 0 || grown < entry || grown > int64(tc.readers)*entry {
				t.Fatalf("segment grew by %d bytes, want 1 to %d entries of %d", grown, tc.readers, entry)
			}
			f.check(t, k, op, 0)
		})
	}
}

// TestKVArchiveReadThroughOnlyEnded: a record read from the bucket is
// not archived when the index does not hold it ended at the revision
// read: another process ended it, or wrote it again, and the watcher has
// not applied that yet; nor is one read after Close, which logs nothing.
func TestKVArchiveReadThroughOnlyEnded(t *testing.T) {
	ctx, f := newArchiveTest(t)
	ops := f.unarchived(t, 2)
	now := time.Now()
	vm := "vm-1"
	running, err := f.plain.CreateOperation(ctx, commands.Operation{ID: "op-running", Type: commands.OpAttach,
		Status: commands.StatusExecuting, VolumeID: "vol-running", VMID: &vm, Request: json.RawMessage(`{}`), CreatedAt: now, UpdatedAt: now})
	if err != nil {
		t.Fatal(err)
	}
	k := f.open(t, true)
	if err := k.watcher.r.Close(ctx); err != nil { // the index stays as it is
		t.Fatal(err)
	}
	annotated := ops[0]
	annotated.Details = map[string]any{"note": "later"}
	if annotated, err = f.plain.UpdateOperation(ctx, annotated); err != nil {
		t.Fatal(err)
	}
	ended := running
	ended.Status, ended.CompletedAt, ended.UpdatedAt = commands.StatusCompleted, &now, now
	if ended, err = f.plain.UpdateOperation(ctx, ended); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name      string
		held, now commands.Operation // as the index holds it, as the bucket does
		before    func()
	}{
		{"ended since", running, ended, nil},
		{"written again", ops[0], annotated, nil},
		{"after Close", ops[1], ops[1], func() {
			if err := k.Close(ctx); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.before != nil {
				tc.before()
			}
			k.mu.RLock()
			endedAt := k.endedAt(tc.held.ID)
			k.mu.RUnlock()
			got, err := k.GetOperation(ctx, tc.held.ID)
			listed := make([]commands.Operation, 1)
			if err == nil {
				err = k.getOps(ctx, []string{tc.held.ID}, []uint64{endedAt}, []int{0}, listed)
			}
			if err != nil {
				t.Fatal(err)
			}
			for _, g := range []commands.Operation{got, listed[0]} {
				if g.Revision != tc.now.Revision {
					t.Fatalf("read revision %d, want the bucket's, %d", g.Revision, tc.now.Revision)
				}
			}
			if n := len(archiveFiles(t, f.dir)); n != 0 {
				t.Fatalf("%d archive files written, want none", n)
			}
			if l := testenv.Mentioning(f.logs.Lines(), "not archived"); len(l) != 0 {
				t.Fatalf("logged %q", l)
			}
		})
	}
}

// archivedSize is the size of the segment at path, 0 if there is none.
func archivedSize(t *testing.T, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return 0
	}
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

// archivedBy waits until k's archive holds op (its watcher archives
// another process's write after the index takes it).
func archivedBy(ctx context.Context, t *testing.T, k *KV, op commands.Operation) {
	t.Helper()
	waitFor(ctx, t, "the archive of "+op.ID, func() bool {
		_, err := k.archive.get(op.ID, op.Revision)
		return err == nil
	})
}

// samePlace writes the place of revision from's entry as revision rev's.
func samePlace(t *testing.T, dir string, rev, from uint64) {
	t.Helper()
	p := make([]byte, 8)
	src, err := os.Open(filepath.Join(dir, mapName(from)))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	if _, err := src.ReadAt(p, int64(from%(1<<kvArchiveMapShift))*8); err != nil {
		t.Fatal(err)
	}
	dst, err := os.OpenFile(filepath.Join(dir, mapName(rev)), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	if _, err := dst.WriteAt(p, int64(rev%(1<<kvArchiveMapShift))*8); err != nil {
		t.Fatal(err)
	}
}

func fileSize(t *testing.T, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

func writeFile(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func removeFile(t *testing.T, path string) {
	t.Helper()
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
}

// archiveFiles lists the segments and maps in dir, sorted.
func archiveFiles(t *testing.T, dir string) []string {
	t.Helper()
	des, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, de := range des {
		if n := de.Name(); n != kvArchiveStream && n != kvArchiveThrough {
			out = append(out, n)
		}
	}
	return out
}

// TestKVReadsAfterClose reads a record held in the index's base file
// after the store's Close, as a request still in flight at shutdown does:
// an answer or an error, never a panic.
func TestKVReadsAfterClose(t *testing.T) {
	ctx, f := newCacheTest(t, "closedreads")
	f.create(t, f.plain, 30)
	k, err := NewKV(ctx, f.js, KVConfig{Bucket: f.bucket, IndexCache: f.path, Archive: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(ctx, t, "the start's base", func() bool { return baseName(k) != "" })
	if err := k.Close(ctx); err != nil {
		t.Fatal(err)
	}
	rctx, cancel := context.WithCancel(ctx)
	cancel() // no wait for a watcher that is gone
	_, _ = k.GetOperation(rctx, "op-3")
	_, _ = k.RecentOperation("op-3")
}

// TestArchiveMisses: a revision without a place, a pruned segment and a
// closed archive are misses (read from the bucket without a warning), not
// errors.
func TestArchiveMisses(t *testing.T) {
	dir := t.TempDir()
	a, err := openArchive(dir, "KV_x", time.Unix(1, 0), 0, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ended := time.Now()
	a.put("op-1", 3, ended.UnixMicro(), []byte(`{}`), true)
	a.put("op-2", 9, ended.Add(-72*time.Hour).UnixMicro(), []byte(`{}`), true)
	if _, err := a.get("op-1", 3); err != nil {
		t.Fatal(err)
	}
	a.prune(ended.Add(-time.Hour)) // op-2's segment, not the map
	for _, rev := range []uint64{2, 9, 100} {
		if _, err := a.get("op", rev); !errors.Is(err, errArchiveMiss) {
			t.Errorf("revision %d: %v, want a miss", rev, err)
		}
	}
	a.close()
	if _, err := a.get("op-1", 3); !errors.Is(err, errArchiveMiss) {
		t.Errorf("after close: %v, want a miss", err)
	}
}

// TestArchiveFailuresLogged: a failing archive write is logged once,
// not at every read of a record: again only after a write succeeded.
func TestArchiveFailuresLogged(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ops-archive")
	var logs testenv.Buffer
	a, err := openArchive(dir, "KV_x", time.Unix(1, 0), 0, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer a.close()
	ended := time.Now().UnixMicro()
	rev := uint64(0)
	for _, step := range []struct {
		gone   bool // the directory
		logged int  // failures logged after the step's puts
	}{{true, 1}, {false, 1}, {true, 2}} {
		if step.gone {
			if err := os.RemoveAll(dir); err != nil {
				t.Fatal(err)
			}
		} else if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		for range 3 {
			rev += 1 << kvArchiveMapShift // a map to open: the files open are unlinked, not gone
			a.put("op-1", rev, ended, []byte(`{}`), true)
		}
		if l := testenv.Mentioning(logs.Lines(), "not archived"); len(l) != step.logged {
			t.Fatalf("after %d puts: %d failures logged, want %d: %q", rev>>kvArchiveMapShift, len(l), step.logged, l)
		}
	}
}

// TestKVReadByIDAfterClose reads an ended operation by id after the
// store's Close, once another process has written since (as a request in
// flight at shutdown does): the stopped watcher never meets the read
// barrier, so the read goes to the bucket instead of waiting for its
// context to end.
func TestKVReadByIDAfterClose(t *testing.T) {
	ctx, f := newArchiveTest(t)
	k := f.open(t, false)
	op := f.terminal(t, k, time.Now())
	if err := k.Close(ctx); err != nil {
		t.Fatal(err)
	}
	f.terminal(t, f.plain, time.Now())
	got, err := k.GetOperation(ctx, op.ID)
	if err != nil || got.Revision != op.Revision {
		t.Fatalf("read after Close: revision %d, %v; want %d", got.Revision, err, op.Revision)
	}
}

// TestKVListingReadsArchiveOnlyEnded: a listing reads the archive only
// for an operation the index holds ended at that revision; an entry at
// the revision of one not ended (a history a restore dropped) is not
// answered.
func TestKVListingReadsArchiveOnlyEnded(t *testing.T) {
	ctx, f := newArchiveTest(t)
	k := f.open(t, false)
	vm := "vm-1"
	now := time.Now()
	op, err := k.CreateOperation(ctx, commands.Operation{ID: "op-running", Type: commands.OpAttach, Status: commands.StatusExecuting,
		VolumeID: "vol-1", VMID: &vm, Request: json.RawMessage(`{}`), CreatedAt: now, UpdatedAt: now})
	if err != nil {
		t.Fatal(err)
	}
	dropped := op
	dropped.Status, dropped.CompletedAt = commands.StatusFailed, &now
	raw, err := json.Marshal(dropped)
	if err != nil {
		t.Fatal(err)
	}
	k.archive.put(op.ID, op.Revision, now.UnixMicro(), raw, true)
	k.mu.Lock()
	k.recent.forget(op.ID) // as for an operation written long ago
	k.mu.Unlock()
	ops, _, err := k.ListOperations(ctx, Filter{VolumeID: "vol-1", Limit: 10})
	if err != nil {
		t.Fatal(err)
	}
	if len(ops) != 1 || ops[0].Status != commands.StatusExecuting {
		t.Fatalf("listing: %+v, want op-running executing, as the bucket holds it", ops)
	}
}

// TestArchiveNotAfterPrune: a record of a day the retention pruned (the
// retention's read of a record it deletes, a backfill of an old history)
// is not archived again, in a segment of that day the next pass would
// remove; a record of a day kept is.
func TestArchiveNotAfterPrune(t *testing.T) {
	dir := t.TempDir()
	a, err := openArchive(dir, "KV_x", time.Now(), 10, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer a.close()
	cut := time.Now().Add(-30 * 24 * time.Hour)
	a.prune(cut)
	for _, c := range []struct {
		rev       uint64
		completed time.Time
		archived  bool
	}{
		{1, cut.Add(-kvArchiveMargin - 24*time.Hour), false},
		{2, time.Now(), true},
	} {
		a.put("op", c.rev, opScore(c.completed), []byte(`{}`), false)
		_, err := a.get("op", c.rev)
		if got := err == nil; got != c.archived {
			t.Fatalf("record completed %s, after a prune at %s: archived %v (%v), want %v", c.completed, cut, got, err, c.archived)
		}
	}
}
