package state

import (
	"context"
	"encoding/json"
	"path/filepath"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
)

// TestKVCacheDoubt: a cache file is trusted only while it reflects the
// bucket; each field that says otherwise makes the start read every
// record. (A stream begun past a revision the cache holds: TestKVIndexCache.)
func TestKVCacheDoubt(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	js := testenv.StartBus(t).JetStream()
	path := filepath.Join(t.TempDir(), "index.cache")
	k, err := NewKV(ctx, js, KVConfig{Bucket: "doubt", IndexCache: path})
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"op-1", "op-2"} {
		op := commands.Operation{ID: id, Type: commands.OpCreate, Status: commands.StatusPending, VolumeID: "vol-1",
			Request: json.RawMessage(`{}`), CreatedAt: time.Now(), UpdatedAt: time.Now()}
		if _, err := k.CreateOperation(ctx, op); err != nil {
			t.Fatal(err)
		}
	}
	if err := k.Close(ctx); err != nil {
		t.Fatal(err)
	}
	k, err = NewKV(ctx, js, KVConfig{Bucket: "doubt"})
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close(ctx)
	for _, tc := range []struct {
		name  string
		spoil func(c *kvCache)
		doubt bool
	}{
		{"as written", func(*kvCache) {}, false},
		{"another stream", func(c *kvCache) { c.stream = "KV_other" }, true},
		{"made again", func(c *kvCache) { c.created = c.created.Add(time.Nanosecond) }, true},
		{"ahead of the stream", func(c *kvCache) { c.seq = c.sealSeq + 1 }, true},
		{"older than half the markers' life", func(c *kvCache) { c.written = time.Now().Add(-kvCacheMaxAge - time.Minute) }, true},
		{"from the future", func(c *kvCache) { c.written = time.Now().Add(time.Hour) }, true},
		{"its last revision on another key", func(c *kvCache) { c.maxKey = "op.other" }, true},
		{"another history (its seal not there)", func(c *kvCache) { c.sealNonce = "other" }, true},
		{"its seal gone", func(c *kvCache) { c.sealSeq = c.maxRev }, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := readCache(path)
			if err != nil {
				t.Fatal(err)
			}
			if c.ops.len() != 2 || c.minRev == 0 || c.maxRev <= c.minRev {
				t.Fatalf("read %d operations, revisions %d to %d", c.ops.len(), c.minRev, c.maxRev)
			}
			tc.spoil(c)
			why, err := k.cacheDoubt(ctx, c)
			if err != nil || (why != "") != tc.doubt {
				t.Fatalf("doubt %q (%v), want doubt %v", why, err, tc.doubt)
			}
		})
	}
	// A check the stream did not answer uses no cache this time and
	// keeps the file for the next start: no answer is no doubt.
	k.cache = path
	gone, stop := context.WithCancel(ctx)
	stop()
	if seq := k.loadCache(gone); seq != 0 {
		t.Fatalf("loaded a cache it could not check (sequence %d)", seq)
	}
	if seq := k.loadCache(ctx); seq == 0 {
		t.Fatal("the cache not checked was not kept for the next start")
	}
}

// TestKVCacheLaggingWatcher: a cache written while the watcher is behind
// the stream is dated no later than the first record it misses, so that
// its age bounds the age of the delete markers a start must still find
// (kvCacheMaxAge), however long the watcher lagged.
func TestKVCacheLaggingWatcher(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	js := testenv.StartBus(t).JetStream()
	path := filepath.Join(t.TempDir(), "index.cache")
	k, err := NewKV(ctx, js, KVConfig{Bucket: "lag", IndexCache: path})
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close(ctx)
	other, err := NewKV(ctx, js, KVConfig{Bucket: "lag"})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close(ctx)
	newOp := func(id string) commands.Operation {
		return commands.Operation{ID: id, Type: commands.OpCreate, Status: commands.StatusPending, VolumeID: "vol-1",
			Request: json.RawMessage(`{}`), CreatedAt: time.Now(), UpdatedAt: time.Now()}
	}
	if _, err := k.CreateOperation(ctx, newOp("op-1")); err != nil {
		t.Fatal(err)
	}
	if err := k.caughtUp(ctx); err != nil {
		t.Fatal(err)
	}
	// The watcher stops: what other stores write is not applied.
	if err := k.watcher.r.Close(ctx); err != nil {
		t.Fatal(err)
	}
	missed := time.Now()
	if _, err := other.CreateOperation(ctx, newOp("op-2")); err != nil {
		t.Fatal(err)
	}
	if err := k.saveCache(ctx); err != nil {
		t.Fatal(err)
	}
	c, err := readCache(path)
	if err != nil {
		t.Fatal(err)
	}
	if c.ops.len() != 1 {
		t.Fatalf("cache holds %d operations, want 1", c.ops.len())
	}
	if c.written.After(missed) {
		t.Fatalf("cache dated %s, after the record it misses (written from %s)", c.written, missed)
	}
}

// TestKVCacheRedelivered: a record at or below the sequence of the index
// cache a store started on, delivered by its watcher all the same (a
// server that starts a consumer below its start sequence), changes
// nothing: an operation and a mapping deleted before that sequence stay
// deleted.
func TestKVCacheRedelivered(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	js := testenv.StartBus(t).JetStream()
	path := filepath.Join(t.TempDir(), "index.cache")
	k, err := NewKV(ctx, js, KVConfig{Bucket: "redelivered", IndexCache: path})
	if err != nil {
		t.Fatal(err)
	}
	op := commands.Operation{ID: "op-1", Type: commands.OpCreate, Status: commands.StatusPending, VolumeID: "vol-1",
		Request: json.RawMessage(`{}`), CreatedAt: time.Now(), UpdatedAt: time.Now()}
	op, err = k.CreateOperation(ctx, op)
	if err != nil {
		t.Fatal(err)
	}
	m, err := k.PutMapping(ctx, commands.Mapping{ID: "map-1", VolumeID: "vol-1", VMID: "vm-1", DevicePath: "/dev/vdb",
		CloudStackState: commands.CloudStackAttached, LinuxState: commands.LinuxDetected, CreatedAt: time.Now(), UpdatedAt: time.Now()})
	if err != nil {
		t.Fatal(err)
	}
	if err := k.DeleteOperation(ctx, op.ID, op.Revision); err != nil {
		t.Fatal(err)
	}
	if err := k.DeleteMapping(ctx, m.VolumeID, m.Revision); err != nil {
		t.Fatal(err)
	}
	if err := k.Close(ctx); err != nil {
		t.Fatal(err)
	}
	k, err = NewKV(ctx, js, KVConfig{Bucket: "redelivered", IndexCache: path})
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close(ctx)
	if k.loaded == 0 {
		t.Fatal("cache not loaded")
	}
	opRaw, _ := json.Marshal(op)
	mRaw, _ := json.Marshal(m)
	if err := k.applyWatchedOp(op.ID, op.Revision, opRaw, true); err != nil {
		t.Fatal(err)
	}
	if err := k.applyMapping(m.VolumeID, m.Revision, mRaw, true); err != nil {
		t.Fatal(err)
	}
	if ops, _, err := k.ListOperations(ctx, Filter{}); err != nil || len(ops) != 0 {
		t.Fatalf("operations %v (%v), want none", ops, err)
	}
	if ms, err := k.ListMappings(ctx, ""); err != nil || len(ms) != 0 {
		t.Fatalf("mappings %v (%v), want none", ms, err)
	}
}

// answeredElsewhere is a stream whose cached info is another read's
// answer, stored after the caller's own: that of a leader that had lost
// its quorum.
type answeredElsewhere struct {
	jetstream.Stream
	other *jetstream.StreamInfo
}

func (s answeredElsewhere) CachedInfo() *jetstream.StreamInfo { return s.other }

// TestKVCacheQuorumOwnAnswer: a cache write judges the stream's quorum by
// the answer to its own barrier, not by the stream info a concurrent read
// stored last.
func TestKVCacheQuorumOwnAnswer(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	js := testenv.StartBus(t).JetStream()
	path := filepath.Join(t.TempDir(), "index.cache")
	k, err := NewKV(ctx, js, KVConfig{Bucket: "quorum", IndexCache: path})
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close(ctx)
	other := *k.stream.CachedInfo()
	other.Cluster = &jetstream.ClusterInfo{Leader: "s1", Replicas: []*jetstream.PeerInfo{{Name: "s2", Offline: true}, {Name: "s3", Offline: true}}}
	if quorate(&other) {
		t.Fatal("the other answer has a quorum")
	}
	k.stream = answeredElsewhere{Stream: k.stream, other: &other}
	if err := k.saveCache(ctx); err != nil {
		t.Fatalf("cache write on a stream with its quorum: %v", err)
	}
	if _, err := readCache(path); err != nil {
		t.Fatal(err)
	}
}
