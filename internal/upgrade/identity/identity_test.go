package identity_test

import (
	"context"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/internal/upgrade/identity"
	"github.com/volumed/volumed/state"
)

// TestBackfill: on this VM, a detected mapping without identity gets the
// identity of the disk at its path when its size matches, and its export
// the mapping's; a mapping whose disk is not here, one of another size,
// and another VM's are left; a second run writes nothing.
func TestBackfill(t *testing.T) {
	b := testenv.StartBus(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	store, err := state.NewKV(ctx, b.JetStream(), state.KVConfig{})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close(ctx)
	const vm, other = "vm-here", "vm-there"
	now := time.Now().UTC()
	for _, m := range []commands.Mapping{
		{VolumeID: "here", VMID: vm, DevicePath: "/dev/vdb", Size: 1 << 30, LinuxState: commands.LinuxDetected},
		{VolumeID: "gone", VMID: vm, DevicePath: "/dev/vdc", Size: 1 << 30, LinuxState: commands.LinuxDetected},
		{VolumeID: "resized", VMID: vm, DevicePath: "/dev/vdd", Size: 1 << 30, LinuxState: commands.LinuxDetected},
		{VolumeID: "elsewhere", VMID: other, DevicePath: "/dev/vdb", Size: 1 << 30, LinuxState: commands.LinuxDetected},
	} {
		m.ID, m.CreatedAt, m.UpdatedAt = "mapping-"+m.VolumeID, now, now
		if _, err := store.PutMapping(ctx, m); err != nil {
			t.Fatal(err)
		}
	}
	for _, e := range []commands.Export{
		{VolumeID: "here", VMID: vm, ExportName: "volhere", DevicePath: "/dev/vdb", Status: commands.ExportActive},
		{VolumeID: "gone", VMID: vm, ExportName: "volgone", DevicePath: "/dev/vdc", Status: commands.ExportActive},
	} {
		e.CreatedAt, e.UpdatedAt = now, now
		if _, err := store.PutExport(ctx, e); err != nil {
			t.Fatal(err)
		}
	}
	devices := []commands.Device{
		{Name: "vdb", Path: "/dev/vdb", Major: 253, Minor: 16, DiskSeq: 7, Size: 1 << 30},
		{Name: "vdd", Path: "/dev/vdd", Major: 253, Minor: 48, DiskSeq: 9, Size: 2 << 30},
	}
	want := devices[0].Identity()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if err := identity.Backfill(ctx, store, vm, devices, log); err != nil {
		t.Fatal(err)
	}
	revs := map[string]uint64{}
	for vol, wantID := range map[string]*commands.DeviceIdentity{"here": &want, "gone": nil, "resized": nil, "elsewhere": nil} {
		m, err := store.GetMapping(ctx, vol)
		if err != nil {
			t.Fatal(err)
		}
		if (m.DeviceIdentity == nil) != (wantID == nil) || (wantID != nil && *m.DeviceIdentity != *wantID) {
			t.Errorf("mapping of %s: identity %v, want %v", vol, m.DeviceIdentity, wantID)
		}
		revs["map "+vol] = m.Revision
	}
	for vol, wantID := range map[string]*commands.DeviceIdentity{"here": &want, "gone": nil} {
		e, err := store.GetExport(ctx, vol)
		if err != nil {
			t.Fatal(err)
		}
		if (e.DeviceIdentity == nil) != (wantID == nil) || (wantID != nil && *e.DeviceIdentity != *wantID) {
			t.Errorf("export of %s: identity %v, want %v", vol, e.DeviceIdentity, wantID)
		}
		revs["export "+vol] = e.Revision
	}
	if err := identity.Backfill(ctx, store, vm, devices, log); err != nil {
		t.Fatal(err)
	}
	for key, rev := range revs {
		var got uint64
		if vol, ok := strings.CutPrefix(key, "map "); ok {
			m, _ := store.GetMapping(ctx, vol)
			got = m.Revision
		} else if vol, ok := strings.CutPrefix(key, "export "); ok {
			e, _ := store.GetExport(ctx, vol)
			got = e.Revision
		}
		if got != rev {
			t.Errorf("%s rewritten by a second run: revision %d, was %d", key, got, rev)
		}
	}
}

// TestBackfillWaitsForQuorum: a member restarting while the two others do
// too (a three-member cluster, the bucket's leader among those lost)
// backfills once they are back, instead of failing at start.
func TestBackfillWaitsForQuorum(t *testing.T) {
	const n = 3
	c, _ := testenv.StartJSCluster(t, n)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	const bucket = "identity"
	_, js0 := c.Connect(0)
	setup, err := state.NewKV(ctx, js0, state.KVConfig{Bucket: bucket, Replicas: n})
	if err != nil {
		t.Fatal(err)
	}
	if err := setup.Close(ctx); err != nil {
		t.Fatal(err)
	}
	// The member that stays leads neither the cluster nor the bucket.
	survivor := c.AnyBystander("KV_" + bucket)
	_, js := c.Connect(survivor)
	var out testenv.Buffer
	log := slog.New(slog.NewTextHandler(&out, &slog.HandlerOptions{Level: slog.LevelDebug}))
	store, err := state.NewKV(ctx, js, state.KVConfig{Bucket: bucket, Replicas: n, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close(context.Background())
	const vm = "vm-here"
	now := time.Now().UTC()
	m := commands.Mapping{ID: "mapping-here", VolumeID: "here", VMID: vm, DevicePath: "/dev/vdb", Size: 1 << 30,
		LinuxState: commands.LinuxDetected, CreatedAt: now, UpdatedAt: now}
	if _, err := store.PutMapping(ctx, m); err != nil {
		t.Fatal(err)
	}
	devices := []commands.Device{{Name: "vdb", Path: "/dev/vdb", Major: 253, Minor: 16, DiskSeq: 7, Size: 1 << 30}}
	c.StopAllBut(survivor)
	done := make(chan error, 1)
	go func() { done <- identity.Backfill(context.Background(), store, vm, devices, log) }()
	c.OutlastOutage(survivor, &out, done)
	// The write may be the first attempt's, whose answer was lost: a
	// stream leader just elected can answer a read with the revision
	// before it for a moment.
	want := devices[0].Identity()
	testenv.Eventually(t, 10*time.Second, func() bool {
		got, err := store.GetMapping(ctx, "here")
		return err == nil && got.DeviceIdentity != nil && *got.DeviceIdentity == want
	}, "the mapping's identity recorded\n%s", &out)
}
