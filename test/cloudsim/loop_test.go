package cloudsim_test

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mdlayher/kobject"

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
	if !s.LocalDevicesEnabled() {
		t.Fatal("local devices disabled although /dev/loop-control works")
	}
	cs := syncClient(s)
	vol := createVolume(t, cs, "loop-vol", 2)
	if _, text := attach(t, cs, vol, cloudsim.ApplianceVMID, -1); text != "" {
		t.Fatal(text)
	}
	dev, ok := s.LocalDevice(vol)
	if !ok {
		t.Fatal("no local device after attach to the appliance")
	}
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
	testenv.Eventually(t, 5*time.Second, func() bool { return ev.seen(kobject.Add, name) }, "add uevent for %s", name)
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
	testenv.Eventually(t, 5*time.Second, func() bool { return ev.seen(kobject.Remove, name) }, "remove uevent for %s", name)
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
	cs := syncClient(s)
	vol := createVolume(t, cs, "anon", 1)
	if _, text := attach(t, cs, vol, cloudsim.ApplianceVMID, -1); text != "" {
		t.Fatal(text)
	}
	dev, ok := s.LocalDevice(vol)
	if !ok {
		t.Fatal("no local device")
	}
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
