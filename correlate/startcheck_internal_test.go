package correlate

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/nats-io/nats.go"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
)

// TestStartCheckWithoutAgent: the reads of a VM's mappings are held only
// while a check can come: a VM whose agent does not answer is found so
// and its mappings stand as recorded; a VM without detected mappings at
// start is never held, not even under a context already ended.
func TestStartCheckWithoutAgent(t *testing.T) {
	b := testenv.StartBus(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	store, c := newStoreAndCorrelator(ctx, t, b)
	silent, bare := uuid.NewString(), uuid.NewString()
	at := time.Now().UTC()
	for _, m := range []commands.Mapping{
		{VolumeID: uuid.NewString(), VMID: silent, DevicePath: "/dev/vdb", LinuxState: commands.LinuxDetected},
		{VolumeID: uuid.NewString(), VMID: bare, LinuxState: commands.LinuxMissing},
	} {
		m.ID, m.CloudStackState, m.Size, m.CreatedAt, m.UpdatedAt, m.LastSync = "mapping-"+m.VolumeID, commands.CloudStackAttached, 1<<30, at, at, at
		if _, err := store.PutMapping(ctx, m); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close(context.Background()) })
	ended, end := context.WithCancel(ctx)
	end()
	if waited, err := c.AwaitStartCheck(ended, bare); waited || err != nil {
		t.Fatalf("VM without detected mappings: waited %v, err %v; want neither", waited, err)
	}
	wait, stop := context.WithTimeout(ctx, 5*time.Second)
	defer stop()
	if _, err := c.AwaitStartCheck(wait, silent); err != nil {
		t.Fatalf("VM whose agent does not answer: %v; want its mappings as recorded", err)
	}
}

// failingPuts is a store whose first fails mapping writes fail, as when
// the store is briefly unreachable: a fault no real store makes on cue.
type failingPuts struct {
	state.Store
	fails atomic.Int32
}

func (s *failingPuts) PutMapping(ctx context.Context, m commands.Mapping) (commands.Mapping, error) {
	if s.fails.Add(-1) >= 0 {
		return commands.Mapping{}, errors.New("store unreachable (test)")
	}
	return s.Store.PutMapping(ctx, m)
}

// failedHeal is a correlator started over a VM, vm, whose agent lists
// no devices, and one detected mapping of it, volume vol's on /dev/vdb
// (gone); the store fails the first mapping write: the heal at start's.
type failedHeal struct {
	kv      *state.KV
	store   *failingPuts
	c       *Correlator
	vm, vol string
}

func startFailedHeal(ctx context.Context, t *testing.T) failedHeal {
	t.Helper()
	b := testenv.StartBus(t)
	kv, _ := newStoreAndCorrelator(ctx, t, b)
	f := failedHeal{kv: kv, store: &failingPuts{Store: kv}, vm: uuid.NewString(), vol: uuid.NewString()}
	at := time.Now().UTC()
	if _, err := kv.PutMapping(ctx, commands.Mapping{ID: "mapping-" + f.vol, VolumeID: f.vol, VMID: f.vm, DevicePath: "/dev/vdb",
		Size: 1 << 30, LinuxState: commands.LinuxDetected, CloudStackState: commands.CloudStackAttached,
		CreatedAt: at, UpdatedAt: at, LastSync: at}); err != nil {
		t.Fatal(err)
	}
	for subject, reply := range map[string]string{
		commands.DevicesListSubject(f.vm):  "[]",
		commands.DevicesNamesSubject(f.vm): `{"names":{}}`,
	} {
		sub, err := b.Conn().Subscribe(subject, func(m *nats.Msg) { _ = m.Respond([]byte(reply)) })
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = sub.Unsubscribe() })
	}
	f.store.fails.Store(1)
	f.c = New(Config{Conn: b.Conn(), JetStream: b.JetStream(), Store: f.store, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err := f.c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.c.Close(context.Background()) })
	return f
}

// TestStartCheckAfterFailedHeal: the heal at start of a VM whose agent
// answers fails (its mapping, whose disk is gone, cannot be marked
// missing: the store fails the write). Nothing else may come to check
// the VM's mappings (no device event, no reconcile): the heal is tried
// again, the mapping is marked missing and the reads of the VM are not
// held for good.
func TestStartCheckAfterFailedHeal(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	f := startFailedHeal(ctx, t)
	wait, stop := context.WithTimeout(ctx, 30*time.Second)
	defer stop()
	if _, err := f.c.AwaitStartCheck(wait, f.vm); err != nil {
		t.Fatalf("VM whose heal at start failed once: %v; want it checked by a heal tried again", err)
	}
	if m, err := f.kv.GetMapping(ctx, f.vol); err != nil || m.LinuxState != commands.LinuxMissing || m.DevicePath != "" {
		t.Fatalf("mapping after the check: %+v, %v; want it missing", m, err)
	}
	if f.store.fails.Load() >= 0 {
		t.Fatal("the heal at start did not write: the test did not make it fail")
	}
}

// TestReconcileEndsStartCheckOnlyWhenChecked: a reconcile ends a VM's
// start check only if no mapping of the VM names a disk it does not have
// now. One whose volume CloudStack does not list as attached is not
// repaired by it: while such a mapping names a gone disk (its heal at
// start failed), the VM's mapping reads stay held.
func TestReconcileEndsStartCheckOnlyWhenChecked(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	f := startFailedHeal(ctx, t)
	testenv.Eventually(t, 10*time.Second, func() bool { return f.store.fails.Load() <= 0 }, "the heal at start tried its write")
	// Before the heal is tried again (resyncRetry): CloudStack lists no
	// volume attached to the VM.
	if _, err := f.c.Reconcile(ctx, f.vm, nil); err != nil {
		t.Fatal(err)
	}
	ended, end := context.WithCancel(ctx)
	end()
	m, err := f.kv.GetMapping(ctx, f.vol)
	if err != nil || m.DevicePath == "" {
		t.Fatalf("mapping %+v, %v: the heal was tried again before the reconcile; the test checks nothing", m, err)
	}
	if _, err := f.c.AwaitStartCheck(ended, f.vm); err == nil {
		t.Fatalf("after a reconcile that left mapping %+v naming a gone disk: the VM's reads are not held", m)
	}
}
