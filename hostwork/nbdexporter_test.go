package hostwork

import (
	"context"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/devagent"
	"github.com/volumed/volumed/devagent/loopdev"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/internal/testloop"
	"github.com/volumed/volumed/nbd"
)

// TestNBDExporterServesOnlyTheVolumesDisk: an export record whose
// identity is the disk's now (as, after a reboot restarted the diskseqs,
// one recorded for a volume whose disk went can be another volume's disk,
// restored at start) is served only if the disk does not carry another
// volume's identity. A disk without identity (its volume matched by size
// and time) is served.
func TestNBDExporterServesOnlyTheVolumesDisk(t *testing.T) {
	testenv.RequireLoopControl(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	own := uuid.NewString()
	dir := t.TempDir()
	dev := testloop.Volume(ctx, t, dir, own)
	anon := testloop.Volume(ctx, t, dir, "anonymous") // vol-anonymous.img: names no volume
	// Closed before the loop device is removed: an export holds it open.
	srv, err := nbd.New(nbd.Config{Listen: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close(context.Background()) })
	identity := func(dev *loopdev.Device) commands.DeviceIdentity {
		d, ok, err := devagent.Sysfs{}.Disk(dev.Name())
		if err != nil || !ok {
			t.Fatalf("%s in sysfs: %v, %v", dev.Path, ok, err)
		}
		return d.Identity()
	}
	x := NBDExporter{Server: srv}
	for _, tc := range []struct {
		name   string
		dev    *loopdev.Device
		volume string
		served bool
	}{
		{"another volume's disk", dev, uuid.NewString(), false},
		{"its volume's disk", dev, own, true},
		{"a disk without identity", anon, uuid.NewString(), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := identity(tc.dev)
			e := commands.Export{VolumeID: tc.volume, ExportName: devagent.PersistentName(tc.volume), DeviceIdentity: &id}
			err := x.Sync(ctx, []commands.Export{e})
			if _, served := x.Clients()[e.ExportName]; served != tc.served || (err == nil) != tc.served {
				t.Fatalf("export of volume %s on %s (%s): served %v (%v), want %v", tc.volume, tc.dev.Path, id, served, err, tc.served)
			}
		})
	}
}
