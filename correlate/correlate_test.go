package correlate_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/correlate"
	"github.com/volumed/volumed/devagent"
	"github.com/volumed/volumed/devagent/loopdev"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
)

func TestAttachThenDetach(t *testing.T) {
	e := setup(t, false, 20*time.Second)
	id, m := e.attachAndCorrelate(t, 2)
	e.checkMapped(t, id, m)
	if m.Size != 2*gb {
		t.Errorf("mapping size %d, want %d", m.Size, 2*gb)
	}
	if got := e.corr.Controller(m.DevicePath); got != "loop" {
		t.Errorf("Controller(%s) = %q, want loop", m.DevicePath, got)
	}
	if e.corr.NoIdentity(vm) {
		t.Error("NoIdentity true after a match by identity: attaches would be serialized for nothing")
	}
	health, count, interval, events := e.corr.Status()
	if health != correlate.HealthHealthy || count == 0 || interval != 5*time.Second || events == 0 {
		t.Errorf("Status() = %s, %d devices, %v, %d events", health, count, interval, events)
	}

	e.detach(t, id)
	if err := e.corr.Detached(context.Background(), m); err != nil {
		t.Fatalf("Detached: %v", err)
	}
	if _, err := os.Lstat(filepath.Join(e.namesDir, devagent.PersistentName(id))); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("persistent name still there after detach: %v", err)
	}
	if _, err := os.Stat(m.DevicePath); err == nil {
		if d, ok, _ := (devagent.Sysfs{}).Disk(filepath.Base(m.DevicePath)); ok && devagent.MatchesVolume(d, id) {
			t.Errorf("device %s of the volume still present", m.DevicePath)
		}
	}
}

// Sixteen volumes of the same size attached at once each get the device
// whose backing file carries their own UUID.
func TestConcurrentSameSizeAttaches(t *testing.T) {
	e := setup(t, false, 30*time.Second)
	const n = 16
	ids := make([]string, n)
	for i := range ids {
		ids[i] = e.createVolume(t, 1)
	}
	maps := make([]commands.Mapping, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i, id := range ids {
		wg.Go(func() {
			want, since, err := e.attach(id)
			if err == nil {
				maps[i], err = e.correlate(context.Background(), want, since)
			}
			errs[i] = err
		})
	}
	wg.Wait()
	seen := map[string]string{}
	for i, id := range ids {
		if errs[i] != nil {
			t.Errorf("volume %s: %v", id, errs[i])
			continue
		}
		e.checkMapped(t, id, maps[i])
		if other, dup := seen[maps[i].DevicePath]; dup {
			t.Errorf("%s given to %s and %s", maps[i].DevicePath, other, id)
		}
		seen[maps[i].DevicePath] = id
	}
}

// With backing files that carry no identity, sequential attaches of
// same-size volumes are matched by size and time.
func TestAnonymousDevicesBySizeAndTime(t *testing.T) {
	e := setup(t, true, 20*time.Second)
	if !e.corr.NoIdentity("0b7c0f4e-0000-4000-8000-00000000abcd") {
		t.Error("NoIdentity of an unknown VM is false")
	}
	for range 3 {
		id, m := e.attachAndCorrelate(t, 13)
		e.checkMapped(t, id, m)
		if !e.corr.NoIdentity(vm) {
			t.Error("NoIdentity false after a size-and-time correlation")
		}
	}
}

// A device that does not come fails the attach with linux_state missing;
// when it comes later the mapping heals and is published.
func TestTimeoutThenLateDeviceHeals(t *testing.T) {
	e := setup(t, false, 1500*time.Millisecond)
	id := e.createVolume(t, 1)
	var size int64
	vols, err := e.cs.Volume.ListVolumes(e.cs.Volume.NewListVolumesParams())
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range vols.Volumes {
		if v.Id == id {
			size = v.Size
		}
	}
	healed := make(chan commands.Mapping, 1)
	sub, err := e.nc.Subscribe(commands.MappingSubject(id), func(msg *nats.Msg) {
		var m commands.Mapping
		if json.Unmarshal(msg.Data, &m) == nil {
			healed <- m
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()

	// Correlate before CloudStack attaches: nothing can appear.
	m, err := e.correlate(context.Background(), commands.Mapping{VolumeID: id, VMID: vm, Size: size}, time.Now())
	if !errors.Is(err, correlate.ErrTimeout) {
		t.Fatalf("Attached error = %v, want ErrTimeout", err)
	}
	if m.LinuxState != commands.LinuxMissing || m.CloudStackState != commands.CloudStackAttached || m.DevicePath != "" {
		t.Fatalf("timed-out mapping = %+v", m)
	}

	if _, _, err := e.attach(id); err != nil {
		t.Fatal(err)
	}
	select {
	case got := <-healed:
		e.checkMapped(t, id, got)
	case <-time.After(20 * time.Second):
		t.Fatal("no healed mapping published")
	}
	stored, err := e.store.GetMapping(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	e.checkMapped(t, id, stored)
}

// A device removed behind the daemon's back is noticed from its remove
// event; Reconcile repairs a mapping broken by hand, re-creates a lost
// mapping and re-points a persistent name pointing elsewhere.
func TestReconcileRepairs(t *testing.T) {
	e := setup(t, false, 20*time.Second)
	ctx := context.Background()
	gone, _ := e.attachAndCorrelate(t, 1)
	broken, _ := e.attachAndCorrelate(t, 1)
	lost, _ := e.attachAndCorrelate(t, 1)
	attached := []commands.Mapping{{VolumeID: gone, VMID: vm, Size: gb}, {VolumeID: broken, VMID: vm, Size: gb},
		{VolumeID: lost, VMID: vm, Size: gb}}

	changes, err := e.corr.Reconcile(ctx, vm, attached)
	if err != nil || len(changes) != 0 {
		t.Fatalf("Reconcile of a clean VM = %q, %v", changes, err)
	}

	// Behind the daemon's back.
	dev := e.simDevice(t, gone)
	idx, err := strconv.Atoi(strings.TrimPrefix(dev.Path, "/dev/loop"))
	if err != nil {
		t.Fatal(err)
	}
	if err := (&loopdev.Device{Index: idx, Path: dev.Path, Backing: dev.BackingFile}).Remove(ctx); err != nil {
		t.Fatalf("remove %s: %v", dev.Path, err)
	}
	// The remove event alone is noticed: the mapping no longer points at
	// the device that is gone.
	testenv.Eventually(t, 30*time.Second, func() bool {
		gm, err := e.store.GetMapping(ctx, gone)
		return err == nil && gm.LinuxState == commands.LinuxMissing && gm.DevicePath == ""
	}, "mapping of the removed %s marked missing", dev.Path)
	bm, _ := e.store.GetMapping(ctx, broken)
	bm.DevicePath, bm.LinuxState = "/dev/loop99999", commands.LinuxDetected
	if _, err := e.store.PutMapping(ctx, bm); err != nil {
		t.Fatal(err)
	}
	if err := e.store.DeleteMapping(ctx, lost, 0); err != nil {
		t.Fatal(err)
	}
	lostLink := filepath.Join(e.namesDir, devagent.PersistentName(lost))
	if err := os.Remove(lostLink); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/dev/null", lostLink); err != nil {
		t.Fatal(err)
	}

	changes, err = e.corr.Reconcile(ctx, vm, attached)
	if err != nil {
		t.Fatalf("Reconcile: %v", err)
	}
	for _, want := range []string{
		"mapping of volume " + broken + " on VM " + vm + " now points at its device " + e.simDevice(t, broken).Path,
		"mapped attached volume " + lost + " on VM " + vm + " to " + e.simDevice(t, lost).Path,
	} {
		if !slices.ContainsFunc(changes, func(c string) bool { return strings.HasPrefix(c, want) }) {
			t.Errorf("no change %q in %q", want, changes)
		}
	}
	gm, _ := e.store.GetMapping(ctx, gone)
	if gm.LinuxState != commands.LinuxMissing || gm.DevicePath != "" {
		t.Errorf("mapping of removed device = %+v", gm)
	}
	if e.link(gone) != "" {
		t.Errorf("persistent name of removed device still -> %s", e.link(gone))
	}
	for _, id := range []string{broken, lost} {
		m, err := e.store.GetMapping(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		e.checkMapped(t, id, m)
	}

	changes, err = e.corr.Reconcile(ctx, vm, attached)
	if err != nil || len(changes) != 0 {
		t.Errorf("second Reconcile = %q, %v", changes, err)
	}
}

// A persistent name pointing elsewhere is re-made by Reconcile.
func TestReconcileRepointsName(t *testing.T) {
	e := setup(t, false, 20*time.Second)
	id, m := e.attachAndCorrelate(t, 1)
	link := filepath.Join(e.namesDir, devagent.PersistentName(id))
	if err := os.Remove(link); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/dev/null", link); err != nil {
		t.Fatal(err)
	}
	changes, err := e.corr.Reconcile(context.Background(), vm, []commands.Mapping{{VolumeID: id, VMID: vm, Size: gb}})
	if err != nil {
		t.Fatal(err)
	}
	want := "persistent name " + devagent.PersistentName(id) + " on VM " + vm + " pointed to /dev/null, now " + m.DevicePath
	if !slices.Contains(changes, want) {
		t.Errorf("changes %q lack %q", changes, want)
	}
	testenv.Eventually(t, 30*time.Second, func() bool { return e.link(id) == m.DevicePath }, "symlink re-made")
}

// A VM without an agent is reported as such quickly.
func TestHasAgentWithoutAgent(t *testing.T) {
	b := testenv.StartBus(t)
	store, err := state.NewKV(context.Background(), b.JetStream(), state.KVConfig{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = store.Close(context.Background()) })
	c := correlate.New(correlate.Config{Conn: b.Conn(), Store: store})
	if err := c.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close(context.Background()) })
	if c.HasAgent(context.Background(), "no-such-vm") {
		t.Error("HasAgent true for a VM without agent")
	}
	if health, _, _, _ := c.Status(); health != correlate.HealthUnknown {
		t.Errorf("health without local agent = %s", health)
	}
	if err := c.Close(context.Background()); err != nil {
		t.Error(err)
	}
}
