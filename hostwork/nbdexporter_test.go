package hostwork

import (
	"context"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/devagent"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/internal/testloop"
	"github.com/volumed/volumed/nbd"
)

// TestNBDExporterServesOnlyTheVolumesDisk: an export record whose
// identity is the disk's now (as, after a reboot restarted the diskseqs,
// one recorded for a volume whose disk went can be another volume's disk,
// restored at start) is served only if the disk does not carry another
// volume's identity.
func TestNBDExporterServesOnlyTheVolumesDisk(t *testing.T) {
	testenv.RequireLoopControl(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	own := uuid.NewString()
	dev := testloop.Volume(ctx, t, t.TempDir(), own)
	// Closed before the loop device is removed: an export holds it open.
	srv, err := nbd.New(nbd.Config{Listen: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close(context.Background()) })
	d, ok, err := devagent.Sysfs{}.Disk(dev.Name())
	if err != nil || !ok {
		t.Fatalf("%s in sysfs: %v, %v", dev.Path, ok, err)
	}
	id := d.Identity()
	x := NBDExporter{Server: srv}
	for _, tc := range []struct {
		name   string
		volume string
		served bool
	}{
		{"another volume's disk", uuid.NewString(), false},
		{"its volume's disk", own, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := commands.Export{VolumeID: tc.volume, ExportName: devagent.PersistentName(tc.volume), DeviceIdentity: &id}
			err := x.Sync(ctx, []commands.Export{e})
			if _, served := x.Clients()[e.ExportName]; served != tc.served || (err == nil) != tc.served {
				t.Fatalf("export of volume %s on %s (%s, volume %s): served %v (%v), want %v",
					tc.volume, dev.Path, id, own, served, err, tc.served)
			}
		})
	}
}
