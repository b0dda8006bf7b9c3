package cloudsim

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/apache/cloudstack-go/v2/cloudstack"

	"github.com/volumed/volumed/internal/testenv"
)

// attachToAppliance creates a volume and attaches it to the appliance.
func attachToAppliance(t *testing.T, cs *cloudstack.CloudStackClient, name string) string {
	t.Helper()
	wait := func(jobID string) {
		testenv.Eventually(t, 10*time.Second, func() bool {
			r, err := cs.Asyncjob.QueryAsyncJobResult(cs.Asyncjob.NewQueryAsyncJobResultParams(jobID))
			if err != nil || r.Jobstatus == jobFailure {
				t.Fatalf("job %s: %v %+v", jobID, err, r)
			}
			return r.Jobstatus == jobSuccess
		}, "job %s", jobID)
	}
	p := cs.Volume.NewCreateVolumeParams()
	p.SetName(name)
	p.SetDiskofferingid(CustomOfferingID)
	p.SetZoneid(ZoneID)
	p.SetSize(1)
	r, err := cs.Volume.CreateVolume(p)
	if err != nil {
		t.Fatal(err)
	}
	wait(r.JobID)
	a, err := cs.Volume.AttachVolume(cs.Volume.NewAttachVolumeParams(r.Id, ApplianceVMID))
	if err != nil {
		t.Fatal(err)
	}
	wait(a.JobID)
	return r.Id
}

// TestRestartReconcilesLoopDevices: Close keeps loop devices; a restart
// keeps the ones still bound, re-creates a lost one and removes a loop
// device of ours that no attachment explains; Teardown removes them all.
func TestRestartReconcilesLoopDevices(t *testing.T) {
	testenv.RequireLoopControl(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cfg := Config{Listen: "127.0.0.1:0", StateDir: t.TempDir(), JobDuration: 10 * time.Millisecond}
	s1, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s1.Teardown(context.Background()) })
	if err := s1.Start(ctx); err != nil {
		t.Fatal(err)
	}
	cs := cloudstack.NewClient(s1.URL(), s1.APIKey(), s1.SecretKey(), false)
	kept := attachToAppliance(t, cs, "kept")
	lost := attachToAppliance(t, cs, "lost")
	keptDev, _ := s1.LocalDevice(kept)
	lostDev, _ := s1.LocalDevice(lost)
	if err := s1.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if b, ok := backingOf(keptDev.Path); !ok || b != keptDev.BackingFile {
		t.Fatalf("Close removed %s (backing %q)", keptDev.Path, b)
	}
	// The host loses one device; a stray of ours appears.
	if err := s1.loops.detach(ctx, lostDev.Path); err != nil {
		t.Fatal(err)
	}
	stray := filepath.Join(cfg.StateDir, disksDir, "stray.img")
	if err := os.WriteFile(stray, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	strayDev, err := s1.loops.attach(ctx, stray)
	if err != nil {
		t.Fatal(err)
	}

	s2, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := s2.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if d, ok := s2.LocalDevice(kept); !ok || d != keptDev {
		t.Fatalf("kept device = %+v, want %+v", d, keptDev)
	}
	d, ok := s2.LocalDevice(lost)
	if b, bound := backingOf(d.Path); !ok || !bound || b != lostDev.BackingFile {
		t.Fatalf("lost device not re-created: %+v (backing %q)", d, b)
	}
	if b, ok := backingOf(strayDev); ok && b == stray {
		t.Fatalf("stray %s still bound to %s", strayDev, stray)
	}
	if err := s2.Teardown(ctx); err != nil {
		t.Fatal(err)
	}
	if owned := s2.loops.owned(); len(owned) != 0 {
		t.Fatalf("after Teardown: %v", owned)
	}
}
