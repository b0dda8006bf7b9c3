package handlers

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
)

// startCheckDevices is the device side of TestVolumeRowAwaitsStartCheck:
// its start check runs check once, as the heal at start would.
type startCheckDevices struct {
	DeviceCorrelator
	check func(ctx context.Context) error
}

func (d startCheckDevices) AwaitStartCheck(ctx context.Context, _ string) (bool, error) {
	return true, d.check(ctx)
}

func (d startCheckDevices) Controller(string) string { return "" }

// TestVolumeRowAwaitsStartCheck: a volume's row (GET /volumes/{id},
// /volumes, /vms/{id}/volumes) names its mapping's device only as the
// VM's check at start left the mapping: read again after the check, which
// marked it missing here, or a 503 when the check is not done in time.
func TestVolumeRowAwaitsStartCheck(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	b := testenv.StartBus(t)
	store, err := state.NewKV(ctx, b.JetStream(), state.KVConfig{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = store.Close(context.Background()) })
	const vol, vm = "3f2b7c1e-8a4d-4e6f-9b0a-1c2d3e4f5a6b", "87654321-4321-4321-4321-210987654321"
	at := time.Now().UTC()
	seed := commands.Mapping{ID: "mapping-1", VolumeID: vol, VMID: vm, DevicePath: "/dev/vdb", Size: 1 << 30,
		CloudStackState: commands.CloudStackAttached, LinuxState: commands.LinuxDetected, CreatedAt: at, UpdatedAt: at, LastSync: at}
	unavailable := commands.Unavailable("the device mappings of VM %s are still being checked", vm)
	for _, tc := range []struct {
		name    string
		check   func(ctx context.Context) error
		wantErr error
	}{
		{"the check marks the mapping missing", func(ctx context.Context) error {
			m, err := store.GetMapping(ctx, vol)
			if err != nil {
				return err
			}
			m.LinuxState, m.DevicePath = commands.LinuxMissing, ""
			_, err = store.PutMapping(ctx, m)
			return err
		}, nil},
		{"the check is not done in time", func(context.Context) error { return unavailable }, unavailable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			old, err := store.GetMapping(ctx, vol)
			if err == nil {
				seed.Revision = old.Revision
			}
			if _, err := store.PutMapping(ctx, seed); err != nil {
				t.Fatal(err)
			}
			st, err := volumeRow(ctx, store, startCheckDevices{check: tc.check}, csapi.Volume{ID: vol, VMID: vm, State: "Ready"})
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("err %v, want %v", err, tc.wantErr)
			}
			if st.DevicePath != nil || st.LinuxData != nil {
				t.Fatalf("row names %s, a disk the check at start found gone", *st.DevicePath)
			}
		})
	}
}
