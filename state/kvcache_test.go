package state_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/stores/storetest"
)

// logBuffer collects a store's log lines.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// openCached opens a store on bucket with the index cache path, and
// returns its log.
func openCached(t *testing.T, js jetstream.JetStream, bucket, path string) (*state.KV, *logBuffer) {
	t.Helper()
	return openLogged(t, js, state.KVConfig{Bucket: bucket, IndexCache: path})
}

// openLogged opens a store with cfg, logging at debug level, and returns
// its log.
func openLogged(t testing.TB, js jetstream.JetStream, cfg state.KVConfig) (*state.KV, *logBuffer) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	logs := &logBuffer{}
	cfg.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	s, err := state.NewKV(ctx, js, cfg)
	if err != nil {
		t.Fatalf("new kv store: %v", err)
	}
	t.Cleanup(func() { _ = s.Close(context.Background()) })
	return s, logs
}

// cacheFilters are the listings a restarted store is compared on.
var cacheFilters = []state.Filter{
	{}, {Type: commands.OpAttach}, {Status: commands.StatusCompleted}, {Status: commands.StatusPending},
	{VolumeID: "vol-1"}, {VMID: "vm-2"}, {RequestedBy: "alice"}, {Type: commands.OpDetach, VMID: "vm-1"},
	{Limit: 3}, {Limit: 3, Cursor: "x"},
}

// sameState fails unless got lists, counts and holds the mappings and
// exports that want (a store that read every record) does.
func sameState(t *testing.T, got, want state.Store) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, f := range cacheFilters {
		if f.Cursor != "" {
			// A cursor from the first page of want.
			_, next, err := want.ListOperations(ctx, state.Filter{Limit: f.Limit})
			if err != nil {
				t.Fatal(err)
			}
			f.Cursor = next
		}
		g, gnext, gerr := got.ListOperations(ctx, f)
		w, wnext, werr := want.ListOperations(ctx, f)
		if gerr != nil || werr != nil || !reflect.DeepEqual(g, w) || gnext != wnext {
			t.Errorf("list %+v: got %v (next %q, %v), want %v (next %q, %v)", f, storetest.IDs(g), gnext, gerr,
				storetest.IDs(w), wnext, werr)
		}
	}
	sameCounts(ctx, t, got, want)
}

// sameCounts fails unless got has want's counts, mappings (by volume and
// by device) and exports.
func sameCounts(ctx context.Context, t *testing.T, got, want state.Store) {
	t.Helper()
	gs, gerr := got.Stats(ctx)
	ws, werr := want.Stats(ctx)
	gs.Writes, ws.Writes = 0, 0
	if gerr != nil || werr != nil || !reflect.DeepEqual(gs, ws) {
		t.Errorf("stats: got %+v (%v), want %+v (%v)", gs, gerr, ws, werr)
	}
	gm, gerr := got.ListMappings(ctx, "")
	wm, werr := want.ListMappings(ctx, "")
	if gerr != nil || werr != nil || !reflect.DeepEqual(gm, wm) {
		t.Errorf("mappings: got %+v (%v), want %+v (%v)", gm, gerr, wm, werr)
	}
	for _, m := range wm {
		if d, err := got.GetMappingByDevice(ctx, m.VMID, m.DevicePath); err != nil || d.VolumeID != m.VolumeID {
			t.Errorf("mapping of %s %s: %+v, %v", m.VMID, m.DevicePath, d, err)
		}
	}
	ge, gerr := got.ListExports(ctx)
	we, werr := want.ListExports(ctx)
	if gerr != nil || werr != nil || !reflect.DeepEqual(ge, we) {
		t.Errorf("exports: got %+v (%v), want %+v (%v)", ge, gerr, we, werr)
	}
}

// changeWhileStopped changes, through o, records of fillCacheTest's that a
// stopped store's cache holds: an operation updated and one created, a
// mapping deleted and one written, an export deleted.
func changeWhileStopped(ctx context.Context, t *testing.T, o *state.KV) {
	t.Helper()
	op, err := o.GetOperation(ctx, storetest.ID(5))
	if err != nil {
		t.Fatal(err)
	}
	op.Status = commands.StatusExecuting
	if _, err := o.UpdateOperation(ctx, op); err != nil {
		t.Fatal(err)
	}
	if _, err := o.CreateOperation(ctx, storetest.Op(100, commands.OpDetach, commands.StatusPending, "vol-1", "vm-1", time.Now())); err != nil {
		t.Fatal(err)
	}
	if err := o.DeleteMapping(ctx, "vol-2", 0); err != nil {
		t.Fatal(err)
	}
	if _, err := o.PutMapping(ctx, storetest.Mapping("vol-3", "vm-2", "/dev/vdd")); err != nil {
		t.Fatal(err)
	}
	if err := o.DeleteExport(ctx, storetest.ID(1), 0); err != nil {
		t.Fatal(err)
	}
}

// TestKVIndexCache: a store restarted on its index cache lists, counts
// and indexes exactly what a store reading every record does, the
// changes other stores made while it was stopped included, and writes on
// the revisions it loaded; a cache it cannot trust is not used, and the
// store reads every record instead.
func TestKVIndexCache(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	bus := testenv.StartBus(t)
	js := bus.JetStream()
	for _, tc := range []struct {
		name string
		// meanwhile runs while the first store is stopped, on another
		// store of the bucket (no cache), with the cache file's path and
		// the bucket's name.
		meanwhile func(t *testing.T, other *state.KV, path, bucket string)
		used      bool
	}{
		{name: "clean restart", used: true},
		{name: "changes while stopped", used: true, meanwhile: func(t *testing.T, o *state.KV, _, _ string) {
			changeWhileStopped(ctx, t, o)
			if _, err := o.PruneOperations(ctx, time.Now().Add(time.Hour), 2); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "corrupt", meanwhile: func(t *testing.T, _ *state.KV, path, _ string) {
			data, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			data[len(data)/2] ^= 0x40
			if err := os.WriteFile(path, data, 0o600); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "truncated", meanwhile: func(t *testing.T, _ *state.KV, path, _ string) {
			if err := os.Truncate(path, 100); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "another bucket's", meanwhile: func(t *testing.T, _ *state.KV, path, _ string) {
			other := nextBucket()
			o, _ := openCached(t, js, other, path+".other")
			if _, err := o.CreateOperation(ctx, storetest.Op(1, commands.OpCreate, commands.StatusPending, "vol-9", "", time.Now())); err != nil {
				t.Fatal(err)
			}
			if err := o.Close(ctx); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(path+".other", path); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "bucket made again", meanwhile: func(t *testing.T, o *state.KV, _, bucket string) {
			if err := o.Close(ctx); err != nil {
				t.Fatal(err)
			}
			if err := js.DeleteKeyValue(ctx, bucket); err != nil {
				t.Fatal(err)
			}
			n := newKV(t, js, bucket)
			if _, err := n.CreateOperation(ctx, storetest.Op(50, commands.OpCreate, commands.StatusPending, "vol-1", "", time.Now())); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "its seal gone", meanwhile: func(t *testing.T, _ *state.KV, _, bucket string) {
			// As in a stream restored from a backup taken before it.
			st, err := js.Stream(ctx, "KV_"+bucket)
			if err != nil {
				t.Fatal(err)
			}
			seal, err := st.GetLastMsgForSubject(ctx, "$KV."+bucket+".meta.cache.>")
			if err != nil {
				t.Fatal(err)
			}
			if err := st.Purge(ctx, jetstream.WithPurgeSubject(seal.Subject)); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "stream purged", meanwhile: func(t *testing.T, _ *state.KV, _, bucket string) {
			st, err := js.Stream(ctx, "KV_"+bucket)
			if err != nil {
				t.Fatal(err)
			}
			if err := st.Purge(ctx); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bucket, path := nextBucket(), filepath.Join(t.TempDir(), "index.cache")
			s1, _ := openCached(t, js, bucket, path)
			fillCacheTest(t, s1)
			if err := s1.Close(ctx); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(path); err != nil {
				t.Fatalf("no cache after Close: %v", err)
			}
			if tc.meanwhile != nil {
				tc.meanwhile(t, newKV(t, js, bucket), path, bucket)
			}

			s2, logs := openCached(t, js, bucket, path)
			if used := strings.Contains(logs.String(), "index cache loaded"); used != tc.used {
				t.Fatalf("cache used %v, want %v; log:\n%s", used, tc.used, logs)
			}
			// A refused cache is removed: what made it doubtful may pass
			// (a stream restored from a backup grows past its sequence).
			if _, err := os.Stat(path); !tc.used && err == nil {
				t.Fatalf("refused cache left in place")
			}
			sameState(t, s2, newKV(t, js, bucket))

			// The revisions loaded are the records': a write on one wins.
			ops, _, err := s2.ListOperations(ctx, state.Filter{Status: commands.StatusPending, Limit: 1})
			if err != nil {
				t.Fatal(err)
			}
			for _, op := range ops { // none when the stream was purged
				op.Status = commands.StatusExecuting
				if _, err := s2.UpdateOperation(ctx, op); err != nil {
					t.Fatalf("update on the loaded revision: %v", err)
				}
			}
			// And the cache written at the next Close is read again.
			if err := s2.Close(ctx); err != nil {
				t.Fatal(err)
			}
			s3, logs := openCached(t, js, bucket, path)
			if !strings.Contains(logs.String(), "index cache loaded") {
				t.Fatalf("the cache written by a store that read every record is not used; log:\n%s", logs)
			}
			sameState(t, s3, newKV(t, js, bucket))
		})
	}
}

// fillCacheTest records operations of every status, some terminal long
// ago, mappings and exports.
func fillCacheTest(t *testing.T, s *state.KV) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	now := time.Now()
	for n := 1; n <= 30; n++ {
		typ := []commands.OpType{commands.OpCreate, commands.OpAttach, commands.OpDetach}[n%3]
		status := commands.OpStatuses[n%len(commands.OpStatuses)]
		vm := ""
		if typ != commands.OpCreate {
			vm = []string{"vm-1", "vm-2"}[n%2]
		}
		op := storetest.Op(n, typ, status, []string{"vol-1", "vol-2", "vol-3"}[n%3], vm, now.Add(time.Duration(n-100)*time.Minute))
		if n%4 == 0 {
			op.RequestedBy = "alice"
		}
		if status.Terminal() {
			done := op.CreatedAt.Add(time.Second)
			op.CompletedAt, op.UpdatedAt = &done, done
		}
		if _, err := s.CreateOperation(ctx, op); err != nil {
			t.Fatal(err)
		}
	}
	for _, m := range []commands.Mapping{storetest.Mapping("vol-1", "vm-1", "/dev/vdb"), storetest.Mapping("vol-2", "vm-1", "/dev/vdc")} {
		if _, err := s.PutMapping(ctx, m); err != nil {
			t.Fatal(err)
		}
	}
	for _, v := range []string{storetest.ID(1), storetest.ID(2)} {
		if _, err := s.PutExport(ctx, storetest.Export(v, false)); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.DeleteOperation(ctx, storetest.ID(30), mustRev(t, s, 30)); err != nil {
		t.Fatal(err)
	}
	if got := storetest.ListIDs(t, s, state.Filter{}); slices.Contains(got, storetest.ID(30)) {
		t.Fatalf("deleted operation listed: %v", got)
	}
}

func mustRev(t *testing.T, s state.Store, n int) uint64 {
	t.Helper()
	op, err := s.GetOperation(context.Background(), storetest.ID(n))
	if err != nil {
		t.Fatal(err)
	}
	return op.Revision
}

// TestKVIndexCacheSharedDevice: mappings of an earlier main that hold one
// device path on a VM (written before device claims) resolve the device
// to the same volume after a restart on the cache as after reading every
// record: the last written.
func TestKVIndexCacheSharedDevice(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	js := testenv.StartBus(t).JetStream()
	bucket, path := nextBucket(), filepath.Join(t.TempDir(), "index.cache")
	newKV(t, js, bucket)
	kv, err := js.KeyValue(ctx, bucket)
	if err != nil {
		t.Fatal(err)
	}
	last := ""
	for n := range 8 {
		m := storetest.Mapping(fmt.Sprintf("vol-%d", n), "vm-1", "/dev/vdb")
		data, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := kv.Put(ctx, "map."+m.VolumeID, data); err != nil {
			t.Fatal(err)
		}
		last = m.VolumeID
	}
	s1, _ := openCached(t, js, bucket, path)
	if err := s1.Close(ctx); err != nil {
		t.Fatal(err)
	}
	s2, logs := openCached(t, js, bucket, path)
	if !strings.Contains(logs.String(), "index cache loaded") {
		t.Fatalf("cache not used; log:\n%s", logs)
	}
	for name, s := range map[string]state.Store{"every record": newKV(t, js, bucket), "cache": s2} {
		m, err := s.GetMappingByDevice(ctx, "vm-1", "/dev/vdb")
		if err != nil || m.VolumeID != last {
			t.Errorf("%s: the device is %s's (%v), want %s's", name, m.VolumeID, err, last)
		}
	}
}

// TestKVBadRecord: a record that does not decode (written by hand, or by
// another program) is left out of the indexes as a start reading every
// record leaves it out, also when it replaces a good one, and reads from
// memory do not wait for it.
func TestKVBadRecord(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	js := testenv.StartBus(t).JetStream()
	bucket := nextBucket()
	s := newKV(t, js, bucket)
	fillCacheTest(t, s)
	kv, err := js.KeyValue(ctx, bucket)
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{"op." + storetest.ID(5), "op.new", "map.vol-1", "export." + storetest.ID(1)} {
		if _, err := kv.Put(ctx, key, []byte("{not json")); err != nil {
			t.Fatal(err)
		}
	}
	// The bad records are the bucket's last: a barrier must pass them.
	bctx, bcancel := context.WithTimeout(ctx, 5*time.Second)
	defer bcancel()
	if _, _, err := s.ListOperations(bctx, state.Filter{}); err != nil {
		t.Fatalf("list after bad records: %v", err)
	}
	sameState(t, s, newKV(t, js, bucket))
}
