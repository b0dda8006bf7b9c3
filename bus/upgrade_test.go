package bus_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/internal/upgrade"
)

// writeGlobal writes what a volumed before NATS authorization left in
// its data dir: the streams and the state bucket in the global account,
// with a queued job, two operation events, and records (a lease too).
func writeGlobal(t *testing.T, dataDir string) {
	t.Helper()
	inGlobal(t, dataDir, func(ctx context.Context, js jetstream.JetStream) {
		for _, sc := range []jetstream.StreamConfig{
			{Name: bus.StreamJobs, Subjects: []string{bus.JobsSubjectPrefix + ">"}, Retention: jetstream.WorkQueuePolicy, Storage: jetstream.FileStorage},
			{Name: bus.StreamOps, Subjects: []string{"volumes.ops.>"}, Storage: jetstream.FileStorage},
			// The first releases' device stream took every devices.> subject.
			{Name: bus.StreamDevices, Subjects: []string{"devices.>"}, Storage: jetstream.FileStorage},
		} {
			if _, err := js.CreateStream(ctx, sc); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := js.Publish(ctx, bus.JobsSubjectPrefix+"op-2", []byte(`{"operation_id":"op-2"}`), jetstream.WithMsgID("op-2")); err != nil {
			t.Fatal(err)
		}
		for _, id := range []string{"op-1", "op-2"} {
			if _, err := js.Publish(ctx, "volumes.ops."+id, []byte(`{"id":"`+id+`"}`)); err != nil {
				t.Fatal(err)
			}
		}
		for _, subject := range []string{"devices.vm-1.add", "devices.vm-1.list"} {
			if _, err := js.Publish(ctx, subject, []byte(`{}`)); err != nil {
				t.Fatal(err)
			}
		}
		kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "volumed_state", History: 1, Storage: jetstream.FileStorage})
		if err != nil {
			t.Fatal(err)
		}
		for k, v := range map[string]string{"op.op-1": `{"id":"op-1"}`, "op.op-2": `{"id":"op-2"}`, "map.vol-1": `{"volume_id":"vol-1"}`,
			"export.vol-1": `{"volume_id":"vol-1"}`, "lease.c3dlZXA": `x`, "op.gone": `{}`} {
			if _, err := kv.Put(ctx, k, []byte(v)); err != nil {
				t.Fatal(err)
			}
		}
		if err := kv.Delete(ctx, "op.gone"); err != nil {
			t.Fatal(err)
		}
	})
}

// inGlobal runs f on the global account of dataDir's JetStream store, as
// a volumed before NATS authorization had it.
func inGlobal(t *testing.T, dataDir string, f func(ctx context.Context, js jetstream.JetStream)) {
	t.Helper()
	ctx := context.Background()
	srv, err := server.NewServer(&server.Options{ServerName: "volumed", DontListen: true, NoLog: true, NoSigs: true,
		JetStream: true, StoreDir: filepath.Join(dataDir, "nats")})
	if err != nil {
		t.Fatal(err)
	}
	srv.Start()
	defer func() { srv.Shutdown(); srv.WaitForShutdown() }()
	if !srv.ReadyForConnections(10 * time.Second) {
		t.Fatal("old server not ready")
	}
	nc, err := nats.Connect("", nats.InProcessServer(srv))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	f(ctx, js)
}

// checkMoved checks the volumed account holds what writeGlobal wrote
// once (the device list request of the first device stream, only if the
// stream was made from its configuration: stored), and the global
// account nothing.
func checkMoved(t *testing.T, dataDir string, devices uint64) {
	t.Helper()
	ctx := context.Background()
	b := bus.New(bus.Config{Listen: "127.0.0.1:0", DataDir: dataDir})
	if err := b.Start(ctx); err != nil {
		t.Fatalf("start: %v", err)
	}
	defer b.Close(ctx)
	js := b.JetStream()
	for stream, want := range map[string]uint64{bus.StreamJobs: 1, bus.StreamOps: 2, bus.StreamDevices: devices, "KV_volumed_state": 4} {
		s, err := js.Stream(ctx, stream)
		if err != nil {
			t.Fatalf("stream %s: %v", stream, err)
		}
		info, err := s.Info(ctx)
		if err != nil || info.State.Msgs != want {
			t.Fatalf("stream %s: %d messages (%v), want %d", stream, info.State.Msgs, err, want)
		}
	}
	job, err := js.Stream(ctx, bus.StreamJobs)
	if err != nil {
		t.Fatal(err)
	}
	if !job.CachedInfo().Config.AllowAtomicPublish {
		t.Errorf("the moved job stream does not allow atomic publish")
	}
	msg, err := job.GetLastMsgForSubject(ctx, bus.JobsSubjectPrefix+"op-2")
	if err != nil || string(msg.Data) != `{"operation_id":"op-2"}` {
		t.Fatalf("the queued job: %v %v", msg, err)
	}
	kv, err := js.KeyValue(ctx, "volumed_state")
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"op.op-1", "op.op-2", "map.vol-1", "export.vol-1"} {
		if _, err := kv.Get(ctx, k); err != nil {
			t.Errorf("record %s: %v", k, err)
		}
	}
	for _, k := range []string{"lease.c3dlZXA", "op.gone"} {
		if _, err := kv.Get(ctx, k); !errors.Is(err, jetstream.ErrKeyNotFound) {
			t.Errorf("record %s copied (%v), want it left out", k, err)
		}
	}
	if left := globalLeft(t, dataDir); len(left) != 0 {
		t.Errorf("the global account still has streams %v", left)
	}
}

// TestStartMovesGlobalAccount: a data dir from before NATS authorization
// has its streams and bucket moved into the volumed account at start; a
// crash before the old ones were deleted (they are put back, the format
// unrecorded) moves them again without duplicating anything.
func TestStartMovesGlobalAccount(t *testing.T) {
	dir := t.TempDir()
	writeGlobal(t, dir)
	global := filepath.Join(dir, "nats", "jetstream", "$G")
	saved := filepath.Join(t.TempDir(), "G")
	if err := os.CopyFS(saved, os.DirFS(global)); err != nil {
		t.Fatal(err)
	}
	checkMoved(t, dir, 2)
	if err := os.RemoveAll(global); err != nil {
		t.Fatal(err)
	}
	if err := os.CopyFS(global, os.DirFS(saved)); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(dir, "nats", bus.FormatFile)); err != nil {
		t.Fatal(err)
	}
	checkMoved(t, dir, 2)
}

// TestStartMergesGlobalAccount: a data dir a release with authorization
// already started on (its own streams made, empty, the global account's
// left behind, as 10bb206 did) gets the global account's contents merged
// into its streams; a message no stream of the volumed account takes is
// skipped.
func TestStartMergesGlobalAccount(t *testing.T) {
	dir := t.TempDir()
	b := bus.New(bus.Config{Listen: "127.0.0.1:0", DataDir: dir})
	if err := b.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := b.JetStream().CreateKeyValue(context.Background(), jetstream.KeyValueConfig{Bucket: "volumed_state", History: 1}); err != nil {
		t.Fatal(err)
	}
	if err := b.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(dir, "nats", bus.FormatFile)); err != nil {
		t.Fatal(err)
	}
	writeGlobal(t, dir)
	checkMoved(t, dir, 1)
}

// TestStartMergesGlobalAccountAfterDowngrade: a data dir already moved
// out of the global account (its format recorded) on which a release from
// before NATS authorization ran again, a downgrade, making its streams
// and bucket there anew and queuing a job: the next start merges them,
// the job kept though its stream numbered it 1 again, within the
// deduplication window of the first move's copy of the job 1 of then.
func TestStartMergesGlobalAccountAfterDowngrade(t *testing.T) {
	dir := t.TempDir()
	writeGlobal(t, dir)
	checkMoved(t, dir, 2)
	inGlobal(t, dir, func(ctx context.Context, js jetstream.JetStream) {
		if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: bus.StreamJobs, Subjects: []string{bus.JobsSubjectPrefix + ">"},
			Retention: jetstream.WorkQueuePolicy, Storage: jetstream.FileStorage}); err != nil {
			t.Fatal(err)
		}
		if _, err := js.Publish(ctx, bus.JobsSubjectPrefix+"op-3", []byte(`{"operation_id":"op-3"}`)); err != nil {
			t.Fatal(err)
		}
		kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "volumed_state", History: 1, Storage: jetstream.FileStorage})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := kv.Put(ctx, "op.op-3", []byte(`{"id":"op-3"}`)); err != nil {
			t.Fatal(err)
		}
	})
	ctx := context.Background()
	b := bus.New(bus.Config{Listen: "127.0.0.1:0", DataDir: dir})
	if err := b.Start(ctx); err != nil {
		t.Fatalf("start: %v", err)
	}
	defer b.Close(ctx)
	js := b.JetStream()
	job, err := js.Stream(ctx, bus.StreamJobs)
	if err != nil {
		t.Fatal(err)
	}
	if msg, err := job.GetLastMsgForSubject(ctx, bus.JobsSubjectPrefix+"op-3"); err != nil || string(msg.Data) != `{"operation_id":"op-3"}` {
		t.Fatalf("the job queued after the downgrade: %v %v", msg, err)
	}
	if info, err := job.Info(ctx); err != nil || info.State.Msgs != 2 {
		t.Fatalf("job stream: %+v %v, want the two jobs", info, err)
	}
	kv, err := js.KeyValue(ctx, "volumed_state")
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"op.op-1", "op.op-2", "op.op-3"} {
		if _, err := kv.Get(ctx, k); err != nil {
			t.Errorf("record %s: %v", k, err)
		}
	}
	if left := globalLeft(t, dir); len(left) != 0 {
		t.Errorf("the global account still has streams %v", left)
	}
}

// TestStartMergesOverDeletedRecord: of a key volumed's account deleted
// (its delete marker still there) before the global account's record of
// it was written (a downgrade) that record is merged, and not if deleted
// after it (a release since NATS authorization ran before the first
// move); of a key it has, its own record is kept.
func TestStartMergesOverDeletedRecord(t *testing.T) {
	for _, tc := range []struct {
		name        string
		globalFirst bool // the global account's records written before the delete
		want        string
	}{
		{name: "deleted before", want: `{"volume_id":"vol-1","vm_id":"vm-2"}`},
		{name: "deleted after", globalFirst: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			dir := t.TempDir()
			global, saved := filepath.Join(dir, "nats", "jetstream", "$G"), filepath.Join(t.TempDir(), "global")
			writeRecords := func() {
				inGlobal(t, dir, func(ctx context.Context, js jetstream.JetStream) {
					kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "volumed_state", History: 1, Storage: jetstream.FileStorage})
					if err != nil {
						t.Fatal(err)
					}
					for k, v := range map[string]string{"map.vol-1": `{"volume_id":"vol-1","vm_id":"vm-2"}`, "export.vol-1": `{"volume_id":"vol-1","port":2}`} {
						if _, err := kv.Put(ctx, k, []byte(v)); err != nil {
							t.Fatal(err)
						}
					}
				})
			}
			if tc.globalFirst {
				writeRecords()
				if err := os.Rename(global, saved); err != nil {
					t.Fatal(err)
				}
			}
			b := bus.New(bus.Config{Listen: "127.0.0.1:0", DataDir: dir})
			if err := b.Start(ctx); err != nil {
				t.Fatalf("start: %v", err)
			}
			kv, err := b.JetStream().CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "volumed_state", History: 1, Storage: jetstream.FileStorage})
			if err != nil {
				t.Fatal(err)
			}
			for k, v := range map[string]string{"map.vol-1": `{"volume_id":"vol-1"}`, "export.vol-1": `{"volume_id":"vol-1"}`} {
				if _, err := kv.Put(ctx, k, []byte(v)); err != nil {
					t.Fatal(err)
				}
			}
			if err := kv.Delete(ctx, "map.vol-1"); err != nil {
				t.Fatal(err)
			}
			if err := b.Close(ctx); err != nil {
				t.Fatal(err)
			}
			if tc.globalFirst {
				if err := os.Rename(saved, global); err != nil {
					t.Fatal(err)
				}
			} else {
				writeRecords()
			}
			b = bus.New(bus.Config{Listen: "127.0.0.1:0", DataDir: dir})
			if err := b.Start(ctx); err != nil {
				t.Fatalf("start: %v", err)
			}
			defer b.Close(ctx)
			if kv, err = b.JetStream().KeyValue(ctx, "volumed_state"); err != nil {
				t.Fatal(err)
			}
			for k, want := range map[string]string{"map.vol-1": tc.want, "export.vol-1": `{"volume_id":"vol-1"}`} {
				var got string
				e, err := kv.Get(ctx, k)
				if err == nil {
					got = string(e.Value())
				}
				if got != want {
					t.Errorf("record %s: %q (%v), want %q", k, got, err, want)
				}
			}
		})
	}
}

// TestStartIgnoresDeletedGlobalStream: a global account's stream the
// server is still removing (or a crash left half removed: its directory
// renamed with a leading dot) is no stream to merge.
func TestStartIgnoresDeletedGlobalStream(t *testing.T) {
	dir := t.TempDir()
	writeGlobal(t, dir)
	checkMoved(t, dir, 2)
	left := filepath.Join(dir, "nats", "jetstream", "$G", "streams", "."+bus.StreamJobs, "msgs")
	if err := os.MkdirAll(left, 0o750); err != nil {
		t.Fatal(err)
	}
	var logs lockedBuffer
	ctx := context.Background()
	b := bus.New(bus.Config{Listen: "127.0.0.1:0", DataDir: dir, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err := b.Start(ctx); err != nil {
		t.Fatalf("start: %v", err)
	}
	if err := b.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if out := logs.String(); strings.Contains(out, "holds streams again") {
		t.Errorf("a half-deleted stream merged as one a downgrade made:\n%s", out)
	}
}

// globalLeft lists the streams left in dataDir's global account: not
// those deleted (renamed with a leading dot), which the server removes
// in the background.
func globalLeft(t *testing.T, dataDir string) []string {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(dataDir, "nats", "jetstream", "$G", "streams"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	var left []string
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), ".") {
			left = append(left, e.Name())
		}
	}
	return left
}

// lockedBuffer is a bytes.Buffer safe for a logger's goroutines.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// TestStartRefusesNewerStore: a store recorded in a format above this
// release's is refused (upgrade.ErrRefused: exit status 2) and left alone.
func TestStartRefusesNewerStore(t *testing.T) {
	dir := t.TempDir()
	marker := filepath.Join(dir, "nats", bus.FormatFile)
	if err := os.MkdirAll(filepath.Dir(marker), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(marker, []byte(`{"format": 99}`), 0o600); err != nil {
		t.Fatal(err)
	}
	b := bus.New(bus.Config{Listen: "127.0.0.1:0", DataDir: dir})
	err := b.Start(context.Background())
	if !errors.Is(err, upgrade.ErrRefused) {
		b.Close(context.Background())
		t.Fatalf("start on format 99: %v, want ErrRefused", err)
	}
	if entries, _ := os.ReadDir(filepath.Join(dir, "nats")); len(entries) != 1 {
		t.Errorf("the refused store dir was written: %v", entries)
	}
}

// TestStartAllowsAtomicPublish: a job stream as releases before atomic
// batches left it (allow_atomic off, and no direct gets) takes them after
// the next start, and direct gets with its one replica, with its queued
// job kept.
func TestStartAllowsAtomicPublish(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	b := bus.New(bus.Config{Listen: "127.0.0.1:0", DataDir: dir})
	if err := b.Start(ctx); err != nil {
		t.Fatal(err)
	}
	js := b.JetStream()
	s, err := js.Stream(ctx, bus.StreamJobs)
	if err != nil {
		t.Fatal(err)
	}
	old := s.CachedInfo().Config
	old.AllowAtomicPublish, old.AllowDirect = false, false
	if _, err := js.UpdateStream(ctx, old); err != nil {
		t.Fatal(err)
	}
	if _, err := js.Publish(ctx, bus.JobsSubjectPrefix+"vol-1.op-1", []byte(`{"operation_id":"op-1"}`)); err != nil {
		t.Fatal(err)
	}
	if err := b.Close(ctx); err != nil {
		t.Fatal(err)
	}
	b = bus.New(bus.Config{Listen: "127.0.0.1:0", DataDir: dir})
	if err := b.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer b.Close(ctx)
	s, err = b.JetStream().Stream(ctx, bus.StreamJobs)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !info.Config.AllowAtomicPublish || !info.Config.AllowDirect || info.State.Msgs != 1 {
		t.Fatalf("job stream after the start: allow_atomic %v, allow_direct %v, %d messages, want both on and the job kept",
			info.Config.AllowAtomicPublish, info.Config.AllowDirect, info.State.Msgs)
	}
	msg, err := s.GetMsg(ctx, 1, jetstream.WithGetMsgSubject(bus.JobsSubjectPrefix+"vol-1.>"))
	if err != nil || string(msg.Data) != `{"operation_id":"op-1"}` {
		t.Fatalf("the job by a direct get of its line: %v, %v", msg, err)
	}
}
