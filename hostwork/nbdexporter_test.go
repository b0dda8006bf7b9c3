package hostwork

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"slices"
	"sync"
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
	srv := startNBD(ctx, t, slog.Default())
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

// TestNBDExporterChecksTheOpenedDisk: the loop device of an export record
// is bound to another file after the record is checked and before the NBD
// server opens it (the kernel name and device number stay, the diskseq
// changes). The opened descriptor is not the recorded disk: the export is
// refused with nbd.ErrWrongDevice and never served, not even for a moment.
func TestNBDExporterChecksTheOpenedDisk(t *testing.T) {
	testenv.RequireLoopControl(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	own := uuid.NewString()
	dir := t.TempDir()
	added := &addedExports{}
	srv := startNBD(ctx, t, slog.New(added))
	for _, tc := range []struct {
		name    string
		rebound string // the file the loop device is bound to between check and open
	}{
		{"another volume's file", testloop.File(t, t.TempDir(), uuid.NewString())},
		{"its volume's file again", testloop.File(t, t.TempDir(), own)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev := testloop.Volume(ctx, t, dir, own)
			d, ok, err := devagent.Sysfs{}.Disk(dev.Name())
			if err != nil || !ok {
				t.Fatalf("%s in sysfs: %v, %v", dev.Path, ok, err)
			}
			_, err = os.Stat("/sys/block/" + dev.Name() + "/diskseq")
			testenv.Require(t, err == nil, "needs a kernel with diskseq (5.15 or later): %v", err)
			id := d.Identity()
			e := commands.Export{VolumeID: own, ExportName: devagent.PersistentName(own), DeviceIdentity: &id}
			x := NBDExporter{Server: srv, beforeOpen: func() {
				if err := dev.Unbind(); err != nil {
					t.Errorf("unbind %s: %v", dev.Path, err)
				}
				if err := dev.Bind(ctx, tc.rebound); err != nil {
					t.Errorf("bind %s to %s: %v", dev.Path, tc.rebound, err)
				}
			}}
			err = x.Sync(ctx, []commands.Export{e})
			if _, served := x.Clients()[e.ExportName]; served || !errors.Is(err, nbd.ErrWrongDevice) {
				t.Fatalf("export of %s (%s) rebound to %s: served %v, err %v; want refused with nbd.ErrWrongDevice",
					dev.Path, id, tc.rebound, served, err)
			}
			if added.has(e.ExportName) {
				t.Fatalf("the NBD server served %s for a while on %s rebound to %s", e.ExportName, dev.Path, tc.rebound)
			}
		})
	}
}

// startNBD starts an NBD server on a free loopback port, closed at the
// end of the test.
func startNBD(ctx context.Context, t *testing.T, log *slog.Logger) *nbd.Server {
	t.Helper()
	srv, err := nbd.New(nbd.Config{Listen: "127.0.0.1:0", Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close(context.Background()) })
	return srv
}

// addedExports is a slog.Handler that keeps the exports an NBD server
// logs as added (served).
type addedExports struct {
	mu    sync.Mutex
	names []string
}

func (a *addedExports) Enabled(context.Context, slog.Level) bool { return true }

func (a *addedExports) Handle(_ context.Context, r slog.Record) error {
	if r.Message != "nbd export added" {
		return nil
	}
	r.Attrs(func(at slog.Attr) bool {
		if at.Key == "export" {
			a.mu.Lock()
			a.names = append(a.names, at.Value.String())
			a.mu.Unlock()
		}
		return true
	})
	return nil
}

func (a *addedExports) WithAttrs([]slog.Attr) slog.Handler { return a }

func (a *addedExports) WithGroup(string) slog.Handler { return a }

// has reports whether the export was ever logged as added.
func (a *addedExports) has(name string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Contains(a.names, name)
}
