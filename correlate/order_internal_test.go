package correlate

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
)

// TestEventsOutOfOrder stores one VM's add, change and remove events in
// the stream in another order than its agent emitted them, the older ones
// after a delay, as three separate subscriptions used to deliver them:
// the correlator ends with the disk the agent reported last, remembers
// the arrival of the new disk only, and notices the gap. Without event
// numbers (an older agent), the identity alone keeps a late remove of
// the old disk from removing the new one.
func TestEventsOutOfOrder(t *testing.T) {
	b := testenv.StartBus(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, c := newStoreAndCorrelator(ctx, t, b)
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close(context.Background()) })

	volA, volB := uuid.NewString(), uuid.NewString()
	old := commands.Device{Name: "vdb", Path: "/dev/vdb", Major: 252, Minor: 16, Size: 1 << 30, DiskSeq: 10,
		Serial: strings20(volA)}
	grown := old
	grown.Size = 2 << 30
	next := commands.Device{Name: "vdb", Path: "/dev/vdb", Major: 252, Minor: 16, Size: 1 << 30, DiskSeq: 11,
		Serial: strings20(volB)}
	type ev struct {
		action commands.DeviceAction
		dev    commands.Device
		seq    uint64
		delay  time.Duration
	}
	for _, tc := range []struct {
		name     string
		numbered bool
	}{{"numbered", true}, {"identity only", false}} {
		t.Run(tc.name, func(t *testing.T) {
			vm := uuid.NewString()
			// Emitted: add old #1, change old #2, remove old #3, add next #4.
			// Stored: #1, #4, then #3 and #2 late.
			stored := []ev{
				{commands.DeviceAdd, old, 1, 0},
				{commands.DeviceAdd, next, 4, 0},
				{commands.DeviceRemove, old, 3, 100 * time.Millisecond},
				{commands.DeviceChange, grown, 2, 100 * time.Millisecond},
			}
			before := c.events.Load()
			for _, e := range stored {
				time.Sleep(e.delay) // the injected delay of a late subscription
				d := e.dev
				d.Action, d.VMID, d.Time = e.action, vm, time.Now().UTC()
				if tc.numbered {
					d.Epoch, d.EventSeq = "run1", e.seq
				}
				data, err := json.Marshal(d)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := b.JetStream().Publish(ctx, commands.DeviceSubject(vm, e.action), data); err != nil {
					t.Fatal(err)
				}
			}
			testenv.Eventually(t, 30*time.Second, func() bool { return c.events.Load() >= before+int64(len(stored)) },
				"%d events consumed", len(stored))
			c.mu.Lock()
			defer c.mu.Unlock()
			tb := c.vms[vm]
			got, ok := tb.devices["vdb"]
			if !ok || got.Identity() != next.Identity() || got.Serial != next.Serial || got.Size != next.Size {
				t.Fatalf("vdb is %+v (%v), want the last reported disk %v", got, ok, next.Identity())
			}
			if _, ok := tb.arrived[next.Identity()]; !ok {
				t.Fatalf("arrival of %v lost", next.Identity())
			}
			if _, ok := tb.arrived[old.Identity()]; ok {
				t.Fatalf("arrival of the removed %v kept", old.Identity())
			}
			if tc.numbered && (tb.seq != 4 || tb.listed) {
				t.Fatalf("seq %d, listed %v: want 4, and the gap after #1 to make the VM listed again", tb.seq, tb.listed)
			}
		})
	}
}

// strings20 is a volume's virtio serial.
func strings20(vol string) string {
	s := ""
	for _, r := range vol {
		if r != '-' {
			s += string(r)
		}
	}
	return s[:20]
}

// TestArrivalsReplayedAtStart stores a disk's add, then starts another
// correlator (a restarted volumed): it knows the disk's arrival, at the
// time the stream stored it, without any new event or list.
func TestArrivalsReplayedAtStart(t *testing.T) {
	b := testenv.StartBus(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	store, err := state.NewKV(ctx, b.JetStream(), state.KVConfig{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = store.Close(context.Background()) })
	vm := uuid.NewString()
	d := commands.Device{Action: commands.DeviceAdd, VMID: vm, Name: "vdc", Path: "/dev/vdc", Major: 252, Minor: 32,
		Size: 1 << 30, DiskSeq: 21, Epoch: "run1", EventSeq: 1, Time: time.Now().UTC()}
	data, err := json.Marshal(d)
	if err != nil {
		t.Fatal(err)
	}
	before := time.Now()
	if _, err := b.JetStream().Publish(ctx, commands.DeviceSubject(vm, commands.DeviceAdd), data); err != nil {
		t.Fatal(err)
	}
	after := time.Now()
	for _, tc := range []struct {
		name   string
		replay time.Duration
		want   bool
	}{{"within the replay window", time.Minute, true}, {"before the replay window", time.Nanosecond, false}} {
		t.Run(tc.name, func(t *testing.T) {
			c := New(Config{Conn: b.Conn(), JetStream: b.JetStream(), Store: store, Replay: tc.replay,
				Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
			if err := c.Start(ctx); err != nil {
				t.Fatal(err)
			}
			defer c.Close(context.Background())
			// A later event of another VM: once it is applied, every older
			// one in the window was (events are read in stream order).
			mark := uuid.NewString()
			md := d
			md.VMID, md.Time = mark, time.Now().UTC()
			mdata, _ := json.Marshal(md)
			if _, err := b.JetStream().Publish(ctx, commands.DeviceSubject(mark, commands.DeviceAdd), mdata); err != nil {
				t.Fatal(err)
			}
			var at time.Time
			testenv.Eventually(t, 30*time.Second, func() bool {
				c.mu.Lock()
				defer c.mu.Unlock()
				if tb := c.vms[vm]; tb != nil {
					at = tb.arrived[d.Identity()]
				}
				return c.vms[mark] != nil
			}, "marker event applied")
			if got := !at.IsZero(); got != tc.want {
				t.Fatalf("arrival %v known: %v, want %v", at, got, tc.want)
			}
			if tc.want && (at.Before(before.Add(-time.Second)) || at.After(after.Add(time.Second))) {
				t.Fatalf("arrival %v, stored between %v and %v", at, before, after)
			}
		})
	}
}

// TestEventsAfterConsumerLost: the consumer the correlator reads the
// device events through goes (as with the cluster member holding it); the
// events stored afterwards are applied, after the earlier ones, each once
// and with no gap in the VM's numbering (a gap would list the VM again).
func TestEventsAfterConsumerLost(t *testing.T) {
	b := testenv.StartBus(t)
	js := b.JetStream()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	store, err := state.NewKV(ctx, js, state.KVConfig{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = store.Close(context.Background()) })
	c := New(Config{Conn: b.Conn(), JetStream: js, Store: store, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close(context.Background()) })
	vm := uuid.NewString()
	emit := func(seq uint64) {
		d := commands.Device{Action: commands.DeviceAdd, VMID: vm, Name: fmt.Sprintf("vd%c", 'b'+rune(seq)),
			Major: 252, Minor: 16 * int(seq), Size: 1 << 30, DiskSeq: 30 + seq, Epoch: "run1", EventSeq: seq,
			Time: time.Now().UTC()}
		d.Path = d.Identity().Path()
		data, err := json.Marshal(d)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := js.Publish(ctx, commands.DeviceSubject(vm, commands.DeviceAdd), data); err != nil {
			t.Fatal(err)
		}
	}
	applied := func(seq uint64) func() bool {
		return func() bool {
			c.mu.Lock()
			defer c.mu.Unlock()
			tb := c.vms[vm]
			return tb != nil && tb.seq >= seq
		}
	}
	emit(1)
	testenv.Eventually(t, 30*time.Second, applied(1), "event #1 applied")
	c.mu.Lock()
	c.vms[vm].listed = true // as after a list: a gap clears it
	c.mu.Unlock()

	s, err := js.Stream(ctx, bus.StreamDevices)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for info := range s.ListConsumers(ctx).Info() {
		names = append(names, info.Name)
	}
	if len(names) != 1 {
		t.Fatalf("consumers of the device events %v, want the correlator's alone", names)
	}
	if err := js.DeleteConsumer(ctx, bus.StreamDevices, names[0]); err != nil {
		t.Fatal(err)
	}
	emit(2)
	emit(3)
	testenv.Eventually(t, 30*time.Second, applied(3), "events #2 and #3 applied after the consumer went")
	time.Sleep(200 * time.Millisecond) // none more after
	c.mu.Lock()
	defer c.mu.Unlock()
	tb := c.vms[vm]
	if n := c.events.Load(); n != 3 || len(tb.devices) != 3 || !tb.listed {
		t.Fatalf("%d events received, devices %v, listed %v: want each of 3 once, in order", n, tb.devices, tb.listed)
	}
}

// newStoreAndCorrelator opens a KV store on b and a correlator over it,
// not started; both close with the test.
func newStoreAndCorrelator(ctx context.Context, t *testing.T, b *bus.Bus) (*state.KV, *Correlator) {
	t.Helper()
	store, err := state.NewKV(ctx, b.JetStream(), state.KVConfig{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = store.Close(context.Background()) })
	return store, New(Config{Conn: b.Conn(), JetStream: b.JetStream(), Store: store,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
}
