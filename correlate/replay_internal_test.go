package correlate

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/nats-io/nats.go"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
)

// TestEventsBeforeListKeepListedDevices: a restarted volumed lists a VM's
// devices while it still replays the events stored before, and heals
// after each. An event stored before the list (an earlier disk under the
// mapped device's name, or the same disk as an older release's agent
// reported it, without diskseq) must not make the mapping of the disk
// the list shows missing; it still tells when its disk came or that it
// went. An event stored after the list is news and applies, and so is
// one stamped before it by a skewed clock, once the agent lists again.
func TestEventsBeforeListKeepListedDevices(t *testing.T) {
	b := testenv.StartBus(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	store, err := state.NewKV(ctx, b.JetStream(), state.KVConfig{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = store.Close(context.Background()) })
	c := New(Config{Conn: b.Conn(), JetStream: b.JetStream(), Store: store,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})

	loop := func(seq uint64, vol string) commands.Device {
		return commands.Device{Name: "loop25", Path: "/dev/loop25", Major: 7, Minor: 25, Size: 1 << 30, DiskSeq: seq,
			BackingFile: "/var/lib/disks/vol-" + vol + ".img"}
	}
	type ev struct {
		action commands.DeviceAction
		dev    commands.Device
		at     time.Duration // stored this long after the list (negative: before)
	}
	for _, tc := range []struct {
		name    string
		mapped  commands.Device   // the disk mapped, and listed
		events  []ev              // applied after the list, in stream order
		now     []commands.Device // what the agent lists next; nil: the mapped disk
		missing bool              // the mapping ends missing
		arrived time.Duration     // when the mapped disk arrived, as the events tell
	}{{
		name:   "older release's agent",
		mapped: loop(8262, "a"),
		events: []ev{{commands.DeviceAdd, loop(0, "a"), -time.Second}},
	}, {
		name:   "earlier disk under the name",
		mapped: loop(12, "b"),
		events: []ev{
			{commands.DeviceAdd, loop(11, "a"), -3 * time.Second},
			{commands.DeviceRemove, loop(11, "a"), -2 * time.Second},
			{commands.DeviceAdd, loop(12, "b"), -time.Second},
		},
		arrived: -time.Second,
	}, {
		name:    "removed after the list",
		mapped:  loop(12, "b"),
		events:  []ev{{commands.DeviceRemove, loop(12, "b"), time.Second}},
		missing: true,
	}, {
		name:    "removed, stamped before the list",
		mapped:  loop(12, "b"),
		events:  []ev{{commands.DeviceRemove, loop(12, "b"), -time.Millisecond}},
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
			c.merge(vm, []commands.Device{tc.mapped}, listed)
			for _, e := range tc.events {
				e.dev.Action, e.dev.VMID = e.action, vm
				c.apply(vm, e.action, e.dev, listed.Add(e.at))
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
