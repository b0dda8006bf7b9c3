package cloudsim_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/apache/cloudstack-go/v2/cloudstack"
	"github.com/mdlayher/kobject"
	"golang.org/x/sys/unix"

	"github.com/volumed/volumed/devagent/loopdev"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/test/cloudsim"
)

// uevents collects kernel uevents of the block subsystem.
type uevents struct {
	mu     sync.Mutex
	events []kobject.Event
}

// listenUevents starts a kobject listener for the test's duration.
func listenUevents(t *testing.T) *uevents {
	t.Helper()
	c, err := kobject.New()
	if err != nil {
		t.Fatalf("kobject: %v", err)
	}
	u := &uevents{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			ev, err := c.Receive()
			if err != nil {
				return
			}
			if ev.Subsystem == "block" {
				u.mu.Lock()
				u.events = append(u.events, *ev)
				u.mu.Unlock()
			}
		}
	}()
	t.Cleanup(func() {
		_ = c.SetDeadline(time.Now())
		c.Close()
		<-done
	})
	return u
}

// seen reports whether an event with action for /dev/<name> arrived.
func (u *uevents) seen(action kobject.Action, name string) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	for _, ev := range u.events {
		if ev.Action == action && filepath.Base(ev.DevicePath) == name {
			return true
		}
	}
	return false
}

// attachToAppliance creates a volume of sizeGB on a simulator with local
// devices, attaches it to the appliance and returns it with its device.
func attachToAppliance(t *testing.T, s *cloudsim.Sim, cs *cloudstack.CloudStackClient, name string, sizeGB int64) (string, cloudsim.LocalDevice) {
	t.Helper()
	if !s.LocalDevicesEnabled() {
		t.Fatal("local devices disabled although /dev/loop-control works")
	}
	vol := createVolume(t, cs, name, sizeGB)
	if _, text := attach(t, cs, vol, cloudsim.ApplianceVMID, -1); text != "" {
		t.Fatalf("attach %s to the appliance: %s", name, text)
	}
	dev, ok := s.LocalDevice(vol)
	if !ok {
		t.Fatalf("no local device after attaching %s to the appliance", name)
	}
	return vol, dev
}

// sysSize is a block device's size in bytes from /sys/block.
func sysSize(name string) int64 {
	b, err := os.ReadFile(filepath.Join("/sys/block", name, "size"))
	if err != nil {
		return -1
	}
	n, _ := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	return n * 512
}

// TestApplianceAttachMakesLoopDevice: attaching to the appliance creates a
// new block device (kernel `add`) of the volume's size, backed by a file
// named after the volume; detaching removes it (`remove`); deleting the
// volume removes the file. Attaching elsewhere makes no device.
func TestApplianceAttachMakesLoopDevice(t *testing.T) {
	testenv.RequireLoopControl(t)
	ev := listenUevents(t)
	s := startSim(t, cloudsim.Config{LocalDevices: cloudsim.LocalDevicesAuto})
	cs := syncClient(s)
	vol, dev := attachToAppliance(t, s, cs, "loop-vol", 2)
	name := filepath.Base(dev.Path)
	if !strings.Contains(filepath.Base(dev.BackingFile), vol) {
		t.Fatalf("backing file %s does not name volume %s", dev.BackingFile, vol)
	}
	if !strings.HasPrefix(dev.BackingFile, s.StateDir()) {
		t.Fatalf("backing file %s not under %s", dev.BackingFile, s.StateDir())
	}
	b, err := os.ReadFile(filepath.Join("/sys/block", name, "loop", "backing_file"))
	if err != nil || strings.TrimSpace(string(b)) != dev.BackingFile {
		t.Fatalf("sysfs backing_file = %q, %v", b, err)
	}
	testenv.Eventually(t, 30*time.Second, func() bool { return ev.seen(kobject.Add, name) }, "add uevent for %s", name)
	if got := sysSize(name); got != 2<<30 {
		t.Fatalf("%s size = %d, want %d", name, got, int64(2<<30))
	}

	other := createVolume(t, cs, "remote-vol", 1)
	if _, text := attach(t, cs, other, cloudsim.RemoteVMID, -1); text != "" {
		t.Fatal(text)
	}
	if d, ok := s.LocalDevice(other); ok {
		t.Fatalf("volume on the remote VM got local device %+v", d)
	}

	dp := cs.Volume.NewDetachVolumeParams()
	dp.SetId(vol)
	r, err := cs.Volume.DetachVolume(dp)
	if err != nil {
		t.Fatal(err)
	}
	if j := waitJob(t, cs, r.JobID); j.Jobstatus != 1 {
		t.Fatalf("detach: %s", j.Jobresult)
	}
	testenv.Eventually(t, 30*time.Second, func() bool { return ev.seen(kobject.Remove, name) }, "remove uevent for %s", name)
	if _, ok := s.LocalDevice(vol); ok {
		t.Fatal("local device still reported after detach")
	}
	if _, err := os.Stat(dev.BackingFile); err != nil {
		t.Fatalf("backing file gone before delete: %v", err)
	}
	if _, err := cs.Volume.DeleteVolume(cs.Volume.NewDeleteVolumeParams(vol)); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dev.BackingFile); !os.IsNotExist(err) {
		t.Fatalf("backing file after delete: %v", err)
	}
}

// TestAnonymousBackingFiles: backing files carry no volume identity.
func TestAnonymousBackingFiles(t *testing.T) {
	testenv.RequireLoopControl(t)
	s := startSim(t, cloudsim.Config{LocalDevices: cloudsim.LocalDevicesAuto, AnonymousBackingFiles: true})
	vol, dev := attachToAppliance(t, s, syncClient(s), "anon", 1)
	base := filepath.Base(dev.BackingFile)
	if strings.Contains(base, vol) || strings.Contains(base, strings.ReplaceAll(vol, "-", "")[:8]) {
		t.Fatalf("anonymous backing file %s names volume %s", base, vol)
	}
}

// TestLocalDevicesOff: with local devices off the appliance gets none.
func TestLocalDevicesOff(t *testing.T) {
	s := startSim(t, cloudsim.Config{LocalDevices: cloudsim.LocalDevicesOff})
	cs := syncClient(s)
	vol := createVolume(t, cs, "off", 1)
	if _, text := attach(t, cs, vol, cloudsim.ApplianceVMID, -1); text != "" {
		t.Fatal(text)
	}
	if d, ok := s.LocalDevice(vol); ok || s.LocalDevicesEnabled() {
		t.Fatalf("local device %+v with devices off", d)
	}
}

// loopIoctl runs a loop ioctl with an integer argument on the device at
// path, as another process would.
func loopIoctl(path string, req uint, arg int) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	return unix.IoctlSetInt(int(f.Fd()), req, arg)
}

// TestDetachLeavesForeignDevice: when another process unbinds, re-creates
// or re-binds a volume's loop device, detaching the volume still succeeds
// but leaves that device alone.
func TestDetachLeavesForeignDevice(t *testing.T) {
	testenv.RequireLoopControl(t)
	unbind := func(t *testing.T, d *loopdev.Device, _ string) {
		if err := loopIoctl(d.Path, unix.LOOP_CLR_FD, 0); err != nil {
			t.Fatalf("LOOP_CLR_FD %s: %v", d.Path, err)
		}
	}
	recreate := func(t *testing.T, d *loopdev.Device, backing string) {
		unbind(t, d, backing)
		testenv.Eventually(t, 30*time.Second, func() bool {
			return loopIoctl(loopdev.Control, unix.LOOP_CTL_REMOVE, d.Index) == nil
		}, "LOOP_CTL_REMOVE %d", d.Index)
		if err := loopIoctl(loopdev.Control, unix.LOOP_CTL_ADD, d.Index); err != nil {
			t.Skipf("index %d taken by yet another process: %v", d.Index, err)
		}
	}
	rebind := func(file func(t *testing.T, backing string) string) func(*testing.T, *loopdev.Device, string) {
		return func(t *testing.T, d *loopdev.Device, backing string) {
			recreate(t, d, backing)
			if err := d.Bind(context.Background(), file(t, backing)); err != nil {
				t.Fatal(err)
			}
		}
	}
	tests := []struct {
		name  string
		other func(t *testing.T, d *loopdev.Device, backing string)
	}{
		{"unbound", unbind},
		{"re-created unbound", recreate},
		{"re-created bound to another file", rebind(func(t *testing.T, _ string) string {
			p := filepath.Join(t.TempDir(), "other.img")
			if err := os.WriteFile(p, make([]byte, 1<<20), 0o600); err != nil {
				t.Fatal(err)
			}
			return p
		})},
		{"re-created bound to the volume's file", rebind(func(_ *testing.T, backing string) string { return backing })},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := startSim(t, cloudsim.Config{LocalDevices: cloudsim.LocalDevicesAuto})
			cs := syncClient(s)
			vol, dev := attachToAppliance(t, s, cs, "foreign", 1)
			d, ok := loopdev.Lookup(filepath.Base(dev.Path))
			if !ok {
				t.Fatalf("%s not bound", dev.Path)
			}
			t.Cleanup(func() {
				_ = loopIoctl(d.Path, unix.LOOP_CLR_FD, 0)
				testenv.Eventually(t, 30*time.Second, func() bool {
					err := loopIoctl(loopdev.Control, unix.LOOP_CTL_REMOVE, d.Index)
					return err == nil || errors.Is(err, unix.ENODEV)
				}, "remove %s", d.Path)
			})
			tc.other(t, &loopdev.Device{Index: d.Index, Path: d.Path}, dev.BackingFile)

			dp := cs.Volume.NewDetachVolumeParams()
			dp.SetId(vol)
			r, err := cs.Volume.DetachVolume(dp)
			if err != nil {
				t.Fatal(err)
			}
			if _, text := jobError(t, waitJob(t, cs, r.JobID)); text != "" {
				t.Fatalf("detach: %s", text)
			}
			if _, err := os.Stat(filepath.Join("/sys/block", d.Name())); err != nil {
				t.Fatalf("the other process's %s was removed: %v", d.Path, err)
			}
		})
	}
}

// TestResizeAttachedApplianceVolume: resizing a volume attached to the
// appliance sets its loop device's capacity: the kernel sends `change` and
// the device has the new size. Data written through the control endpoint
// reads through the device, and a revert (appliance stopped) too.
func TestResizeAttachedApplianceVolume(t *testing.T) {
	testenv.RequireLoopControl(t)
	ev := listenUevents(t)
	s := startSim(t, cloudsim.Config{LocalDevices: cloudsim.LocalDevicesAuto})
	cs := syncClient(s)
	vol, dev := attachToAppliance(t, s, cs, "grow-loop", 1)
	name := filepath.Base(dev.Path)

	readDev := func(off int64, n int) []byte {
		t.Helper()
		f, err := os.Open(dev.Path)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		b := make([]byte, n)
		if _, err := f.ReadAt(b, off); err != nil {
			t.Fatalf("read %s: %v", dev.Path, err)
		}
		return b
	}
	writePattern(t, s, vol, patternA)
	if got := readDev(farOffset, len(patternA)); string(got) != string(patternA) {
		t.Fatalf("device reads %.20q…, want pattern A", got)
	}
	snapID := snapshot(t, cs, vol, "loop-snap")

	p := cs.Volume.NewResizeVolumeParams(vol)
	p.SetSize(2)
	r, err := cs.Volume.ResizeVolume(p)
	if _, text := runJob(t, cs, r.JobID, err); text != "" {
		t.Fatalf("resize: %s", text)
	}
	testenv.Eventually(t, 30*time.Second, func() bool { return ev.seen(kobject.Change, name) }, "change uevent for %s", name)
	if got := sysSize(name); got != 2<<30 {
		t.Fatalf("%s size after resize = %d, want %d", name, got, int64(2<<30))
	}

	writePattern(t, s, vol, patternB)
	setVMState(t, cs, cloudsim.ApplianceVMID, false)
	rv, err := cs.Snapshot.RevertSnapshot(cs.Snapshot.NewRevertSnapshotParams(snapID))
	if _, text := runJob(t, cs, rv.JobID, err); text != "" {
		t.Fatalf("revert: %s", text)
	}
	if got := readDev(0, len(patternA)); string(got) != string(patternA) {
		t.Fatalf("device reads %.20q… after revert, want pattern A", got)
	}
	// The revert brought back the snapshot's size, on the device too.
	if got := sysSize(name); got != 1<<30 {
		t.Fatalf("%s size after revert = %d, want %d", name, got, int64(1<<30))
	}
}
