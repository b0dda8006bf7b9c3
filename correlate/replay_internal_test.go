package correlate

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/nats-io/nats.go"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
)

// TestEventsBeforeListKeepListedDevices: a restarted volumed lists a VM's
// devices while it still replays the events stored before, and heals
// after each. An event stored before the list (an earlier disk under the
// mapped device's name, or the same disk as an older release's agent
// reported it, without diskseq) must not make the mapping of the disk
// the list shows missing; it still tells when its disk came or that it
// went. An event stored after the list is news and applies, also when the
// stream's clock stamped it before the list (a clock behind this host's)
// and the agent answers no list since; and one stored before that
// contradicts the list (an agent whose list lagged) applies once the
// agent lists again.
func TestEventsBeforeListKeepListedDevices(t *testing.T) {
	b := testenv.StartBus(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	store, c := newStoreAndCorrelator(ctx, t, b)

	loop := func(seq uint64, vol string) commands.Device {
		return commands.Device{Name: "loop25", Path: "/dev/loop25", Major: 7, Minor: 25, Size: 1 << 30, DiskSeq: seq,
			BackingFile: "/var/lib/disks/vol-" + vol + ".img"}
	}
	// listSeq is the stream's last sequence when the list was asked for.
	const listSeq = 100
	type ev struct {
		action commands.DeviceAction
		dev    commands.Device
		seq    int           // the stream's sequence, relative to the list's (<= 0: stored before it)
		at     time.Duration // stamped this long after the list was asked for (negative: before)
	}
	for _, tc := range []struct {
		name    string
		mapped  commands.Device   // the disk mapped, and listed
		events  []ev              // applied after the list, in stream order
		now     []commands.Device // what the agent lists next; nil: the mapped disk
		silent  bool              // the agent answers no list after the first
		missing bool              // the mapping ends missing
		arrived time.Duration     // when the mapped disk arrived, as the events tell
	}{{
		name:   "older release's agent",
		mapped: loop(8262, "a"),
		events: []ev{{commands.DeviceAdd, loop(0, "a"), 0, -time.Second}},
	}, {
		name:   "earlier disk under the name",
		mapped: loop(12, "b"),
		events: []ev{
			{commands.DeviceAdd, loop(11, "a"), -2, -3 * time.Second},
			{commands.DeviceRemove, loop(11, "a"), -1, -2 * time.Second},
			{commands.DeviceAdd, loop(12, "b"), 0, -time.Second},
		},
		arrived: -time.Second,
	}, {
		name:    "removed after the list",
		mapped:  loop(12, "b"),
		events:  []ev{{commands.DeviceRemove, loop(12, "b"), 1, time.Second}},
		silent:  true,
		missing: true,
	}, {
		name:    "removed after the list, stamped before it",
		mapped:  loop(12, "b"),
		events:  []ev{{commands.DeviceRemove, loop(12, "b"), 1, -time.Millisecond}},
		silent:  true,
		missing: true,
	}, {
		name:   "replaced after the list, stamped before it",
		mapped: loop(12, "b"),
		events: []ev{
			{commands.DeviceRemove, loop(12, "b"), 1, -2 * time.Millisecond},
			{commands.DeviceAdd, loop(13, "c"), 2, -time.Millisecond},
		},
		silent:  true,
		missing: true,
	}, {
		name:    "removed before a list that lagged",
		mapped:  loop(12, "b"),
		events:  []ev{{commands.DeviceRemove, loop(12, "b"), 0, -time.Millisecond}},
		now:     []commands.Device{},
		missing: true,
	}} {
		t.Run(tc.name, func(t *testing.T) {
			vm := uuid.NewString()
			now := tc.now
			if now == nil {
				now = []commands.Device{tc.mapped}
			}
			agent, err := b.Conn().Subscribe(commands.DevicesListSubject(vm), func(msg *nats.Msg) {
				data, _ := json.Marshal(now)
				_ = msg.Respond(data)
			})
			if err != nil {
				t.Fatal(err)
			}
			defer agent.Unsubscribe()
			if tc.silent {
				_ = agent.Unsubscribe()
			}
			id := tc.mapped.Identity()
			at := time.Now().UTC()
			m, err := store.PutMapping(ctx, commands.Mapping{ID: "mapping-" + uuid.NewString(), VolumeID: uuid.NewString(),
				VMID: vm, DevicePath: tc.mapped.Path, DeviceIdentity: &id, Size: tc.mapped.Size,
				LinuxState: commands.LinuxDetected, CloudStackState: commands.CloudStackAttached,
				CreatedAt: at, UpdatedAt: at, LastSync: at})
			if err != nil {
				t.Fatal(err)
			}
			listed := time.Now()
			c.merge(vm, []commands.Device{tc.mapped}, listSeq, listed)
			for _, e := range tc.events {
				e.dev.Action, e.dev.VMID = e.action, vm
				c.apply(vm, e.action, e.dev, listed.Add(e.at), uint64(listSeq+e.seq))
				if err := c.heal(ctx, vm); err != nil {
					t.Fatal(err)
				}
			}
			got, err := store.GetMapping(ctx, m.VolumeID)
			if err != nil {
				t.Fatal(err)
			}
			if gone := got.LinuxState == commands.LinuxMissing; gone != tc.missing || (!gone && got.DevicePath != tc.mapped.Path) {
				t.Fatalf("mapping %+v; want missing %v", got, tc.missing)
			}
			c.mu.Lock()
			at, ok := c.vms[vm].arrived[id]
			c.mu.Unlock()
			if want := listed.Add(tc.arrived); tc.arrived != 0 && (!ok || !at.Equal(want)) {
				t.Fatalf("arrival of %v: %v (%v), want %v as the stream stored its add", id, at, ok, want)
			}
		})
	}
}

// TestListKnowsTheEventsStoredBefore: a list records the device stream's
// last sequence as asked before the list, so that the events up to it,
// and only those, count as stored before the list; once the correlator
// follows the events with none pending, the last one delivered.
func TestListKnowsTheEventsStoredBefore(t *testing.T) {
	b := testenv.StartBus(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c := New(Config{Conn: b.Conn(), JetStream: b.JetStream(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	c.js = b.JetStream()
	vm := uuid.NewString()
	dev := commands.Device{Name: "loop25", Path: "/dev/loop25", Major: 7, Minor: 25, Size: 1 << 30, DiskSeq: 12, VMID: vm}
	data, _ := json.Marshal(dev)
	ack, err := b.JetStream().Publish(ctx, commands.DeviceSubject(vm, commands.DeviceAdd), data)
	if err != nil {
		t.Fatal(err)
	}
	agent, err := b.Conn().Subscribe(commands.DevicesListSubject(vm), func(msg *nats.Msg) {
		data, _ := json.Marshal([]commands.Device{dev})
		_ = msg.Respond(data)
	})
	if err != nil {
		t.Fatal(err)
	}
	defer agent.Unsubscribe()
	if _, err := c.list(ctx, vm, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	got := c.vms[vm].listedSeq
	c.mu.Unlock()
	if got != ack.Sequence {
		t.Fatalf("list recorded sequence %d, want %d (the event stored before it)", got, ack.Sequence)
	}

	// Once the events are followed and none is pending, the last delivered
	// is taken without asking the stream (here it could not be asked).
	_, c = newStoreAndCorrelator(ctx, t, b)
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close(context.Background()) })
	for c.delivered.Load() != ack.Sequence || !c.caughtUp.Load() {
		select {
		case <-ctx.Done():
			t.Fatalf("event %d not followed: delivered %d, caught up %v", ack.Sequence, c.delivered.Load(), c.caughtUp.Load())
		case <-time.After(10 * time.Millisecond):
		}
	}
	done, stop := context.WithCancel(ctx)
	stop()
	if got := c.lastSeq(done, time.Second); got != ack.Sequence {
		t.Fatalf("caught up: last sequence %d, want %d, the last delivered", got, ack.Sequence)
	}
}

// TestListCaughtUpAtStart: a correlator whose consumer has no event
// pending (none stored within its replay) takes the sequence before the
// consumer's first for the stream's last without asking the stream (here
// it could not be asked), as it does after a delivery.
func TestListCaughtUpAtStart(t *testing.T) {
	b := testenv.StartBus(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	vm := uuid.NewString()
	dev := commands.Device{Name: "loop25", Path: "/dev/loop25", Major: 7, Minor: 25, Size: 1 << 30, DiskSeq: 12, VMID: vm}
	data, _ := json.Marshal(dev)
	ack, err := b.JetStream().Publish(ctx, commands.DeviceSubject(vm, commands.DeviceAdd), data)
	if err != nil {
		t.Fatal(err)
	}
	store, _ := newStoreAndCorrelator(ctx, t, b)
	c := New(Config{Conn: b.Conn(), JetStream: b.JetStream(), Store: store, Replay: time.Nanosecond,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close(context.Background()) })
	done, stop := context.WithCancel(ctx)
	stop()
	if got := c.lastSeq(done, time.Second); got != ack.Sequence || c.events.Load() != 0 {
		t.Fatalf("last sequence %d after %d events, want %d, the event before the replay, without asking", got,
			c.events.Load(), ack.Sequence)
	}
}

// TestOlderListMergedLate: a list asked for before another but answered
// after it does not bring back a disk the later list no longer shows
// (an older agent's disk, whose identity is reused, so no remove marks it
// gone): the mapping of the disk removed between the two lists goes
// missing.
func TestOlderListMergedLate(t *testing.T) {
	b := testenv.StartBus(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	store, c := newStoreAndCorrelator(ctx, t, b)
	vm := uuid.NewString()
	dev := commands.Device{Name: "vdb", Path: "/dev/vdb", Major: 252, Minor: 16, Size: 1 << 30, VMID: vm}
	id := dev.Identity()
	at := time.Now().UTC()
	m, err := store.PutMapping(ctx, commands.Mapping{ID: "mapping-" + uuid.NewString(), VolumeID: uuid.NewString(),
		VMID: vm, DevicePath: dev.Path, DeviceIdentity: &id, Size: dev.Size,
		LinuxState: commands.LinuxDetected, CloudStackState: commands.CloudStackAttached,
		CreatedAt: at, UpdatedAt: at, LastSync: at})
	if err != nil {
		t.Fatal(err)
	}
	earlier := time.Now()
	c.merge(vm, nil, 105, earlier.Add(time.Millisecond))     // the later list: vdb is gone
	c.apply(vm, commands.DeviceRemove, dev, time.Now(), 103) // its remove, stored between the lists
	c.merge(vm, []commands.Device{dev}, 100, earlier)        // the earlier list, answered last
	if err := c.heal(ctx, vm); err != nil {
		t.Fatal(err)
	}
	if got, err := store.GetMapping(ctx, m.VolumeID); err != nil || got.LinuxState != commands.LinuxMissing {
		t.Fatalf("mapping %+v (%v); want missing: its disk went before the later list", got, err)
	}
}

// TestMappingOfAnotherVolumesDiskGoesMissing: after a reboot restarted the
// diskseqs, the disk under a mapping's device name can show the identity
// the mapping recorded (name, number, diskseq) and be another volume's:
// the heal at start marks that mapping missing.
func TestMappingOfAnotherVolumesDiskGoesMissing(t *testing.T) {
	b := testenv.StartBus(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	store, c := newStoreAndCorrelator(ctx, t, b)
	log := &testenv.Buffer{}
	c.log = slog.New(slog.NewTextHandler(log, nil))
	vm, volume, other := uuid.NewString(), uuid.NewString(), uuid.NewString()
	disk := commands.Device{Name: "loop25", Path: "/dev/loop25", Major: 7, Minor: 25, Size: 1 << 30, DiskSeq: 12,
		BackingFile: "/var/lib/disks/vol-" + other + ".img"}
	id := disk.Identity()
	at := time.Now().UTC()
	m, err := store.PutMapping(ctx, commands.Mapping{ID: "mapping-" + uuid.NewString(), VolumeID: volume, VMID: vm,
		DevicePath: disk.Path, DeviceIdentity: &id, Size: disk.Size, LinuxState: commands.LinuxDetected,
		CloudStackState: commands.CloudStackAttached, CreatedAt: at, UpdatedAt: at, LastSync: at})
	if err != nil {
		t.Fatal(err)
	}
	c.merge(vm, []commands.Device{disk}, 1, time.Now())
	if err := c.heal(ctx, vm); err != nil {
		t.Fatal(err)
	}
	got, err := store.GetMapping(ctx, m.VolumeID)
	if err != nil {
		t.Fatal(err)
	}
	if got.LinuxState != commands.LinuxMissing {
		t.Fatalf("mapping of volume %s on %s, now volume %s's disk with the recorded identity: %+v; want missing",
			volume, disk.Path, other, got)
	}
	if want := `reason="its disk carries another volume's identity"`; !strings.Contains(log.String(), want) {
		t.Fatalf("the log does not say why the mapping is missing (%s):\n%s", want, log)
	}
}
