package state

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
)

// TestKVBackfill: a start whose index the archive does not cover (a
// start without a cache file reading more records than it archives, an
// upgrade's first start) archives every terminal record the index holds,
// in the background, and no other; the next start, after a clean stop,
// has nothing to archive; an unclean stop leaves the revisions since the
// last record of progress to archive again, and only those are read.
func TestKVBackfill(t *testing.T) {
	ctx, f := newArchiveTest(t)
	// Recorded by a release without the archive, its index in the cache
	// file: the next start reads none of them from the bucket.
	before, err := NewKV(ctx, f.js, KVConfig{Bucket: f.bucket, IndexCache: f.path})
	if err != nil {
		t.Fatal(err)
	}
	old := []commands.Operation{}
	for i := range 5 {
		old = append(old, f.terminal(t, before, time.Now().Add(-time.Duration(i)*24*time.Hour)))
	}
	now := time.Now()
	pending, err := before.CreateOperation(ctx, commands.Operation{ID: "pending", Type: commands.OpAttach,
		Status: commands.StatusPending, VolumeID: "vol-1", CreatedAt: now, UpdatedAt: now})
	if err != nil {
		t.Fatal(err)
	}
	if err := before.Close(ctx); err != nil {
		t.Fatal(err)
	}

	consumers := func() int {
		info, err := before.stream.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return info.State.Consumers
	}
	watchers := consumers() + 1 // and k's
	k := f.open(t, true)
	waitFor(ctx, t, "the backfill", k.backfilled.Load)
	if n := consumers(); n != watchers {
		t.Fatalf("%d consumers after the backfill, want %d: its own kept", n, watchers)
	}
	for _, op := range old {
		if _, err := k.archive.get(op.ID, op.Revision); err != nil {
			t.Fatalf("%s not archived: %v", op.ID, err)
		}
		f.check(t, k, op, 0)
	}
	if _, err := k.archive.get(pending.ID, pending.Revision); !errors.Is(err, errArchiveMiss) {
		t.Fatalf("a pending operation archived: %v", err)
	}
	if got := k.archive.through(); got < pending.Revision {
		t.Fatalf("through %d, want at least %d", got, pending.Revision)
	}
	later := f.terminal(t, f.plain, time.Now())
	archivedBy(ctx, t, k, later)
	if err := k.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if got := k.archive.through(); got < later.Revision {
		t.Fatalf("through %d after Close, want %d", got, later.Revision)
	}

	// A clean stop: nothing to archive at the next start.
	k = f.open(t, true)
	if !k.backfilled.Load() {
		t.Fatal("a start after a clean stop archives again")
	}
	if err := k.Close(ctx); err != nil {
		t.Fatal(err)
	}

	// As after an unclean stop: the progress recorded is older, and the
	// archive lost an entry (never written): the backfill reads from
	// there only, and writes it again.
	if err := (&opArchive{dir: f.dir}).setThrough(old[len(old)-1].Revision); err != nil {
		t.Fatal(err)
	}
	removeFile(t, filepath.Join(f.dir, mapName(pending.Revision)))
	k = f.open(t, true)
	waitFor(ctx, t, "the backfill", k.backfilled.Load)
	if _, err := k.archive.get(later.ID, later.Revision); err != nil {
		t.Fatalf("%s not archived again: %v", later.ID, err)
	}
	for _, op := range old {
		if _, err := k.archive.get(op.ID, op.Revision); !errors.Is(err, errArchiveMiss) {
			t.Fatalf("%s, before the progress recorded, archived again: %v", op.ID, err)
		}
	}
}

// TestArchiveThrough: the progress recorded is dropped with the archive
// of another stream, and lowered to the stream's last revision when it
// lost revisions (restored from a backup).
func TestArchiveThrough(t *testing.T) {
	dir := t.TempDir()
	created := time.Now()
	a, err := openArchive(dir, "KV_x", created, 100, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if err := a.setThrough(90); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		stream string
		last   uint64
		want   uint64
	}{
		{"KV_x", 100, 90},
		{"KV_x", 50, 50},
		{"KV_y", 100, 0},
	} {
		a, err := openArchive(dir, c.stream, created, c.last, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		if got := a.through(); got != c.want {
			t.Fatalf("%s at %d: through %d, want %d", c.stream, c.last, got, c.want)
		}
	}
}

// TestKVBackfillNoOperationLeft: a backfill whose revisions left hold no
// operation record (the last ones another key's, as after an unclean stop
// that wrote only leases since its progress was recorded) ends, and
// records its progress, without waiting for an operation written later.
func TestKVBackfillNoOperationLeft(t *testing.T) {
	ctx, f := newArchiveTest(t)
	k := f.open(t, true)
	op := f.terminal(t, k, time.Now())
	if _, err := k.AcquireLease(ctx, "leader", "me", time.Hour); err != nil {
		t.Fatal(err)
	}
	if err := k.Close(ctx); err != nil {
		t.Fatal(err)
	}
	seen := k.archive.through()
	if seen <= op.Revision {
		t.Fatalf("through %d after Close, want past %d", seen, op.Revision)
	}
	if err := (&opArchive{dir: f.dir}).setThrough(op.Revision); err != nil {
		t.Fatal(err)
	}
	k = f.open(t, true)
	wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	waitFor(wctx, t, "the backfill", k.backfilled.Load)
	if got := k.archive.through(); got != seen {
		t.Fatalf("through %d, want %d", got, seen)
	}
}

// TestKVBackfillFullRead: a start without a cache file, reading more
// records than it archives as it reads them (kvRecentOps), archives the
// others in the background.
func TestKVBackfillFullRead(t *testing.T) {
	ctx, f := newArchiveTest(t)
	ended := time.Now().Add(-time.Hour)
	ids := make([]string, kvRecentOps+8)
	for i := range ids {
		ids[i] = fmt.Sprintf("full-%d", i)
		data, err := json.Marshal(commands.Operation{ID: ids[i], Type: commands.OpAttach, Status: commands.StatusCompleted,
			VolumeID: "vol-1", CreatedAt: ended, UpdatedAt: ended, CompletedAt: &ended})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.js.Publish(ctx, "$KV."+f.bucket+"."+kvOpPrefix+ids[i], data); err != nil {
			t.Fatal(err)
		}
	}
	k := f.open(t, false)
	waitFor(ctx, t, "the backfill", k.backfilled.Load)
	for _, id := range ids {
		if _, err := k.archive.get(id, k.heldEnded(id)); err != nil {
			t.Fatalf("%s not archived: %v", id, err)
		}
	}
}

// TestKVThroughAtCacheWrite: each periodic cache write records the
// archive's progress, not only Close: a start after an unclean stop then
// archives again only the revisions since the last cache write.
func TestKVThroughAtCacheWrite(t *testing.T) {
	ctx, f := newArchiveTest(t)
	k := f.open(t, true)
	waitFor(ctx, t, "the backfill", k.backfilled.Load)
	op := f.terminal(t, k, time.Now())
	archivedBy(ctx, t, k, op)
	k.compact <- struct{}{} // a cache write now
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	waitFor(wctx, t, "the progress recorded by a cache write", func() bool { return k.archive.through() >= op.Revision })
}
