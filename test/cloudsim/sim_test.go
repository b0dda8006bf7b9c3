package cloudsim_test

import (
	"context"
	"errors"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/apache/cloudstack-go/v2/cloudstack"

	"github.com/volumed/volumed/test/cloudsim"
)

// TestAsyncClientLifecycle drives create, attach, list, detach and delete
// with cloudstack-go's NewAsyncClient, which polls jobs itself.
func TestAsyncClientLifecycle(t *testing.T) {
	s := startSim(t, cloudsim.Config{})
	cs := asyncClient(s)

	created, err := cs.Volume.CreateVolume(createParams(cs, "pvc-async", 3))
	if err != nil {
		t.Fatalf("createVolume: %v", err)
	}
	if created.State != "Allocated" || created.Size != 3<<30 || created.Hypervisor != "None" || created.Name != "pvc-async" {
		t.Fatalf("created volume = %+v", created)
	}

	att, err := cs.Volume.AttachVolume(cs.Volume.NewAttachVolumeParams(created.Id, cloudsim.RemoteVMID))
	if err != nil {
		t.Fatalf("attachVolume: %v", err)
	}
	if att.State != "Ready" || att.Deviceid != 1 || att.Virtualmachineid != cloudsim.RemoteVMID || att.Vmname != "remote-vm" || att.Attached == "" {
		t.Fatalf("attached volume = %+v", att)
	}

	v, n, err := cs.Volume.GetVolumeByID(created.Id)
	if err != nil || n != 1 || v.Deviceid != 1 || v.Virtualmachineid != cloudsim.RemoteVMID {
		t.Fatalf("GetVolumeByID = %+v, %d, %v", v, n, err)
	}

	dp := cs.Volume.NewDetachVolumeParams()
	dp.SetId(created.Id)
	det, err := cs.Volume.DetachVolume(dp)
	if err != nil {
		t.Fatalf("detachVolume: %v", err)
	}
	if det.State != "Ready" || det.Virtualmachineid != "" || det.Vmname != "" {
		t.Fatalf("detached volume = %+v", det)
	}

	del, err := cs.Volume.DeleteVolume(cs.Volume.NewDeleteVolumeParams(created.Id))
	if err != nil || !del.Success {
		t.Fatalf("deleteVolume = %+v, %v", del, err)
	}
	// A deleted volume lists as empty; GetVolumeByID says "No match found".
	_, n, err = cs.Volume.GetVolumeByID(created.Id)
	if err == nil || n != 0 || !strings.Contains(err.Error(), "No match found") {
		t.Fatalf("GetVolumeByID after delete = %d, %v", n, err)
	}

	st := s.Stats()
	if st.AttachesSucceeded[created.Id] != 1 || st.DetachesSucceeded[created.Id] != 1 {
		t.Fatalf("stats = %+v", st)
	}
	if st.Calls["attachVolume"] != 1 || st.Calls["queryAsyncJobResult"] < 3 {
		t.Fatalf("calls = %v", st.Calls)
	}
}

// TestSyncClientCommands covers every read command and VM start/stop with
// NewClient and explicit job polling.
func TestSyncClientCommands(t *testing.T) {
	s := startSim(t, cloudsim.Config{})
	cs := syncClient(s)

	zones, err := cs.Zone.ListZones(cs.Zone.NewListZonesParams())
	if err != nil || zones.Count != 1 || zones.Zones[0].Id != cloudsim.ZoneID || zones.Zones[0].Name != "OSSEA-Zone" {
		t.Fatalf("listZones = %+v, %v", zones, err)
	}
	offs, err := cs.DiskOffering.ListDiskOfferings(cs.DiskOffering.NewListDiskOfferingsParams())
	if err != nil || offs.Count != 2 {
		t.Fatalf("listDiskOfferings = %+v, %v", offs, err)
	}
	custom := map[string]bool{}
	for _, o := range offs.DiskOfferings {
		custom[o.Id] = o.Iscustomized
	}
	if !custom[cloudsim.CustomOfferingID] || custom[cloudsim.FixedOfferingID] {
		t.Fatalf("offerings = %v", custom)
	}
	vms, err := cs.VirtualMachine.ListVirtualMachines(cs.VirtualMachine.NewListVirtualMachinesParams())
	if err != nil || vms.Count != 3 {
		t.Fatalf("listVirtualMachines = %+v, %v", vms, err)
	}
	vp := cs.VirtualMachine.NewListVirtualMachinesParams()
	vp.SetState("Stopped")
	vms, err = cs.VirtualMachine.ListVirtualMachines(vp)
	if err != nil || vms.Count != 1 || vms.VirtualMachines[0].Id != cloudsim.TestVMID {
		t.Fatalf("listVirtualMachines state=Stopped = %+v, %v", vms, err)
	}
	caps, err := cs.Configuration.ListCapabilities(cs.Configuration.NewListCapabilitiesParams())
	if err != nil || caps.Capabilities == nil || caps.Capabilities.Cloudstackversion == "" {
		t.Fatalf("listCapabilities = %+v, %v", caps, err)
	}

	// Root volumes of the inventory list at device 0.
	lp := cs.Volume.NewListVolumesParams()
	lp.SetVirtualmachineid(cloudsim.ApplianceVMID)
	vols, err := cs.Volume.ListVolumes(lp)
	if err != nil || vols.Count != 1 || vols.Volumes[0].Id != cloudsim.ApplianceRootVolumeID || vols.Volumes[0].Type != "ROOT" || vols.Volumes[0].Deviceid != 0 {
		t.Fatalf("appliance volumes = %+v, %v", vols, err)
	}

	// Stop and start: the VM is in transition while the job runs.
	stop, err := cs.VirtualMachine.StopVirtualMachine(cs.VirtualMachine.NewStopVirtualMachineParams(cloudsim.RemoteVMID))
	if err != nil {
		t.Fatalf("stopVirtualMachine: %v", err)
	}
	if j := waitJob(t, cs, stop.JobID); j.Jobstatus != 1 || j.Jobinstancetype != "VirtualMachine" {
		t.Fatalf("stop job = %+v", j)
	}
	vm, _, err := cs.VirtualMachine.GetVirtualMachineByID(cloudsim.RemoteVMID)
	if err != nil || vm.State != "Stopped" {
		t.Fatalf("after stop = %+v, %v", vm, err)
	}
	start, err := cs.VirtualMachine.StartVirtualMachine(cs.VirtualMachine.NewStartVirtualMachineParams(cloudsim.RemoteVMID))
	if err != nil {
		t.Fatalf("startVirtualMachine: %v", err)
	}
	waitJob(t, cs, start.JobID)
	vm, _, err = cs.VirtualMachine.GetVirtualMachineByID(cloudsim.RemoteVMID)
	if err != nil || vm.State != "Running" {
		t.Fatalf("after start = %+v, %v", vm, err)
	}
}

// TestListVolumesFilters checks each filter and the paging.
func TestListVolumesFilters(t *testing.T) {
	s := startSim(t, cloudsim.Config{})
	cs := syncClient(s)
	a := createVolume(t, cs, "vol-a", 1)
	b := createVolume(t, cs, "vol-b", 2)
	c := createVolume(t, cs, "vol-c", 3)
	if _, text := attach(t, cs, b, cloudsim.RemoteVMID, -1); text != "" {
		t.Fatal(text)
	}
	tests := []struct {
		name string
		set  func(p *cloudstack.ListVolumesParams)
		want []string
	}{
		{"id", func(p *cloudstack.ListVolumesParams) { p.SetId(a) }, []string{a}},
		{"vm", func(p *cloudstack.ListVolumesParams) { p.SetVirtualmachineid(cloudsim.RemoteVMID) }, []string{cloudsim.RemoteRootVolumeID, b}},
		{"zone+type", func(p *cloudstack.ListVolumesParams) { p.SetZoneid(cloudsim.ZoneID); p.SetType("DATADISK") }, []string{a, b, c}},
		{"name", func(p *cloudstack.ListVolumesParams) { p.SetName("vol-c") }, []string{c}},
		{"state", func(p *cloudstack.ListVolumesParams) { p.SetType("DATADISK"); p.SetState("Allocated") }, []string{a, c}},
		{"page 2 of 2", func(p *cloudstack.ListVolumesParams) { p.SetType("DATADISK"); p.SetPage(2); p.SetPagesize(2) }, []string{c}},
		{"no match", func(p *cloudstack.ListVolumesParams) { p.SetName("nope") }, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := cs.Volume.NewListVolumesParams()
			tc.set(p)
			r, err := cs.Volume.ListVolumes(p)
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, v := range r.Volumes {
				got = append(got, v.Id)
			}
			if strings.Join(got, ",") != strings.Join(tc.want, ",") {
				t.Fatalf("got %v, want %v", got, tc.want)
			}
		})
	}
}

// TestDeviceIDAllocation: lowest free of 1, 2, 4, 5, …; 3 is reserved; the
// data-disk limit is 6; a freed id is reused.
func TestDeviceIDAllocation(t *testing.T) {
	s := startSim(t, cloudsim.Config{})
	cs := syncClient(s)
	var vols []string
	for i, want := range []int64{1, 2, 4, 5, 6, 7} {
		id := createVolume(t, cs, "d"+string(rune('0'+i)), 1)
		vols = append(vols, id)
		if _, text := attach(t, cs, id, cloudsim.RemoteVMID, -1); text != "" {
			t.Fatalf("attach %d: %s", i, text)
		}
		v, _, err := cs.Volume.GetVolumeByID(id)
		if err != nil || v.Deviceid != want {
			t.Fatalf("volume %d deviceid = %d (%v), want %d", i, v.Deviceid, err, want)
		}
	}
	seventh := createVolume(t, cs, "d7", 1)
	_, text := attach(t, cs, seventh, cloudsim.RemoteVMID, -1)
	if text != "The specified VM already has the maximum number of data disks (6) attached. Please specify another VM." {
		t.Fatalf("7th attach: %q", text)
	}
	// Detach by (vm, deviceid) frees 2; the next attach takes it.
	dp := cs.Volume.NewDetachVolumeParams()
	dp.SetVirtualmachineid(cloudsim.RemoteVMID)
	dp.SetDeviceid(2)
	r, err := cs.Volume.DetachVolume(dp)
	if err != nil {
		t.Fatal(err)
	}
	if j := waitJob(t, cs, r.JobID); j.Jobstatus != 1 || j.Jobinstanceid != "" && j.Jobinstanceid != vols[1] {
		t.Fatalf("detach by tuple: %+v", j)
	}
	if v, _, _ := cs.Volume.GetVolumeByID(vols[1]); v.Virtualmachineid != "" {
		t.Fatalf("volume at 2 still attached: %+v", v)
	}
	if _, text := attach(t, cs, seventh, cloudsim.RemoteVMID, -1); text != "" {
		t.Fatal(text)
	}
	if v, _, _ := cs.Volume.GetVolumeByID(seventh); v.Deviceid != 2 {
		t.Fatalf("reused deviceid = %d, want 2", v.Deviceid)
	}
}

// TestRootDiskRules: device 0 only on a Stopped VM without a root disk.
func TestRootDiskRules(t *testing.T) {
	s := startSim(t, cloudsim.Config{})
	cs := syncClient(s)
	vol := createVolume(t, cs, "root-candidate", 5)
	if _, text := attach(t, cs, vol, cloudsim.RemoteVMID, 0); text != "Root volume detach can happen only when vm is in states: Stopped or Destroyed" {
		t.Fatalf("root attach to running VM: %q", text)
	}
	if _, text := attach(t, cs, vol, cloudsim.TestVMID, 0); text != "" {
		t.Fatalf("root attach to stopped VM without root: %q", text)
	}
	v, _, _ := cs.Volume.GetVolumeByID(vol)
	if v.Deviceid != 0 || v.Type != "ROOT" || v.Virtualmachineid != cloudsim.TestVMID {
		t.Fatalf("root-attached volume = %+v", v)
	}
	other := createVolume(t, cs, "second-root", 5)
	if _, text := attach(t, cs, other, cloudsim.TestVMID, 0); text != "Vm already has root volume attached to it" {
		t.Fatalf("second root: %q", text)
	}
}

// TestErrorPaths checks each error text and code of cloudstack-wire.md.
func TestErrorPaths(t *testing.T) {
	s := startSim(t, cloudsim.Config{})
	cs := syncClient(s)
	const unknown = "00000000-0000-0000-0000-000000000000"
	free := createVolume(t, cs, "free", 1)
	used := createVolume(t, cs, "used", 1)
	if _, text := attach(t, cs, used, cloudsim.RemoteVMID, -1); text != "" {
		t.Fatal(text)
	}
	gone := createVolume(t, cs, "gone", 1)
	if _, err := cs.Volume.DeleteVolume(cs.Volume.NewDeleteVolumeParams(gone)); err != nil {
		t.Fatal(err)
	}

	t.Run("http", func(t *testing.T) {
		create := func(off, zone string, size int64) func() error {
			return func() error {
				p := cs.Volume.NewCreateVolumeParams()
				p.SetName("x")
				if off != "" {
					p.SetDiskofferingid(off)
				}
				if zone != "" {
					p.SetZoneid(zone)
				}
				if size >= 0 {
					p.SetSize(size)
				}
				_, err := cs.Volume.CreateVolume(p)
				return err
			}
		}
		tests := []struct {
			name string
			call func() error
			want string
		}{
			{"create without offering or snapshot", create("", cloudsim.ZoneID, 1), "CloudStack API error 431 (CSExceptionErrorCode: 4350): At least one of disk Offering ID or snapshot ID must be passed whilst creating volume"},
			{"create custom size out of range", create(cloudsim.CustomOfferingID, cloudsim.ZoneID, 1025), "CloudStack API error 431 (CSExceptionErrorCode: 4350): Volume size: 1025 GB is out of allowed range. Min: 1. Max: 1024"},
			{"create fixed with size", create(cloudsim.FixedOfferingID, cloudsim.ZoneID, 5), "CloudStack API error 431 (CSExceptionErrorCode: 4350): This disk offering does not allow custom size"},
			{"create custom without size", create(cloudsim.CustomOfferingID, cloudsim.ZoneID, -1), "CloudStack API error 431 (CSExceptionErrorCode: 4350): This disk offering requires a custom size specified"},
			{"create size 0", create(cloudsim.CustomOfferingID, cloudsim.ZoneID, 0), "CloudStack API error 431 (CSExceptionErrorCode: 4350): Disk size must be larger than 0"},
			{"create unknown offering", create(unknown, cloudsim.ZoneID, 1), "CloudStack API error 431 (CSExceptionErrorCode: 9999): Unable to execute API command createvolume due to invalid value. Invalid parameter diskofferingid value=" + unknown},
			{"attach unknown volume", func() error {
				_, err := cs.Volume.AttachVolume(cs.Volume.NewAttachVolumeParams(unknown, cloudsim.RemoteVMID))
				return err
			}, "Unable to execute API command attachvolume due to invalid value. Invalid parameter id value=" + unknown},
			{"attach unknown vm", func() error {
				_, err := cs.Volume.AttachVolume(cs.Volume.NewAttachVolumeParams(free, unknown))
				return err
			}, "Invalid parameter virtualmachineid value=" + unknown},
			{"list unknown id", func() error {
				p := cs.Volume.NewListVolumesParams()
				p.SetId(unknown)
				_, err := cs.Volume.ListVolumes(p)
				return err
			}, "CloudStack API error 431 (CSExceptionErrorCode: 9999): Unable to execute API command listvolumes due to invalid value. Invalid parameter id value=" + unknown + " due to incorrect long value format, or entity does not exist or due to incorrect parameter annotation for the field in api cmd class."},
			{"delete attached", func() error {
				_, err := cs.Volume.DeleteVolume(cs.Volume.NewDeleteVolumeParams(used))
				return err
			}, "CloudStack API error 431 (CSExceptionErrorCode: 4350): Please specify a volume that is not attached to any VM."},
			{"unknown command", func() error {
				var out map[string]any
				return cs.Custom.(*cloudstack.CustomService).CustomRequest("frobnicateVolume", &cloudstack.CustomServiceParams{}, &out)
			}, "CloudStack API error 432 (CSExceptionErrorCode: 9999): The given command does not exist or it is not available for user"},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				err := tc.call()
				if err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("err = %v, want it to contain %q", err, tc.want)
				}
			})
		}
		// GetVolumeByID reads the unknown-id text as "not found".
		if _, n, err := cs.Volume.GetVolumeByID(unknown); n != 0 || err == nil || !strings.Contains(err.Error(), "No match found") {
			t.Fatalf("GetVolumeByID(unknown) = %d, %v", n, err)
		}
	})

	t.Run("jobs", func(t *testing.T) {
		detach := func(set func(p *cloudstack.DetachVolumeParams)) func() string {
			return func() string {
				p := cs.Volume.NewDetachVolumeParams()
				set(p)
				r, err := cs.Volume.DetachVolume(p)
				if err != nil {
					t.Fatalf("detachVolume: %v", err)
				}
				_, text := jobError(t, waitJob(t, cs, r.JobID))
				return text
			}
		}
		att := func(vol, vm string, dev int64) func() string {
			return func() string { _, text := attach(t, cs, vol, vm, dev); return text }
		}
		tests := []struct {
			name string
			run  func() string
			want string
		}{
			{"attach attached", att(used, cloudsim.ApplianceVMID, -1), "Please specify a volume that is not attached to any VM."},
			{"attach deleted", att(gone, cloudsim.RemoteVMID, -1), "Please specify a volume that is not destroyed."},
			{"device 3", att(free, cloudsim.RemoteVMID, 3), "deviceId should be 0,1,2,4-7"},
			{"device out of range", att(free, cloudsim.RemoteVMID, 8), "deviceId should be 0,1,2,4-7"},
			{"device used", att(free, cloudsim.RemoteVMID, 1), "deviceId 1 is used by vm " + cloudsim.RemoteVMID},
			{"detach not attached", detach(func(p *cloudstack.DetachVolumeParams) { p.SetId(free) }), "The specified volume is not attached to a VM."},
			{"detach nothing", detach(func(p *cloudstack.DetachVolumeParams) {}), "Please provide either a volume id, or a tuple(device id, instance id)"},
			{"detach id and tuple", detach(func(p *cloudstack.DetachVolumeParams) { p.SetId(used); p.SetDeviceid(1) }), "Please provide either a volume id, or a tuple(device id, instance id)"},
			{"detach root of running vm", detach(func(p *cloudstack.DetachVolumeParams) { p.SetId(cloudsim.RemoteRootVolumeID) }), "Root volume detach can happen only when vm is in states: Stopped or Destroyed"},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				if got := tc.run(); got != tc.want {
					t.Fatalf("job error = %q, want %q", got, tc.want)
				}
			})
		}
	})
}

// TestAttachChecksVMStateAndZone uses a two-zone inventory and a stop job
// held long enough to see the Stopping state.
func TestAttachChecksVMStateAndZone(t *testing.T) {
	inv, err := cloudsim.LoadInventory(filepath.Join("testdata", "inventory_two_zones.json"))
	if err != nil {
		t.Fatal(err)
	}
	s := startSim(t, cloudsim.Config{Inventory: inv, Faults: cloudsim.Faults{
		JobDuration: map[string]cloudsim.Duration{"stopVirtualMachine": cloudsim.Duration(time.Hour)}}})
	cs := syncClient(s)
	vol := createVolume(t, cs, "z1", 1)
	if _, text := attach(t, cs, vol, "22222222-2222-4222-8222-222222222222", -1); text != "Please specify a VM that is in the same zone as the volume." {
		t.Fatalf("other zone: %q", text)
	}
	if _, err := cs.VirtualMachine.StopVirtualMachine(cs.VirtualMachine.NewStopVirtualMachineParams("11111111-1111-4111-8111-111111111111")); err != nil {
		t.Fatal(err)
	}
	if _, text := attach(t, cs, vol, "11111111-1111-4111-8111-111111111111", -1); text != "Please specify a VM that is either running or stopped." {
		t.Fatalf("stopping VM: %q", text)
	}
}

// TestBadInventories rejects each file of testdata/bad_inventories.
func TestBadInventories(t *testing.T) {
	files, _ := filepath.Glob(filepath.Join("testdata", "bad_inventories", "*.json"))
	if len(files) == 0 {
		t.Fatal("no bad inventories")
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			if _, err := cloudsim.LoadInventory(f); !errors.Is(err, cloudsim.ErrBadInventory) {
				t.Fatalf("err = %v, want ErrBadInventory", err)
			}
		})
	}
}

// TestInventoryVolumes loads an inventory with data volumes: they are
// listed Ready, attached where it says, on their device, and one detached
// attaches through the API.
func TestInventoryVolumes(t *testing.T) {
	inv, err := cloudsim.LoadInventory(filepath.Join("testdata", "inventory_volumes.json"))
	if err != nil {
		t.Fatal(err)
	}
	s := startSim(t, cloudsim.Config{Inventory: inv, JobDuration: time.Millisecond})
	cs := syncClient(s)
	const vm, attached, detached = "11111111-1111-4111-8111-111111111111", "aaaaaaaa-0000-4000-8000-000000000001", "aaaaaaaa-0000-4000-8000-000000000002"
	p := cs.Volume.NewListVolumesParams()
	p.SetVirtualmachineid(vm)
	r, err := cs.Volume.ListVolumes(p)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]int64{}
	for _, v := range r.Volumes {
		if v.State != "Ready" {
			t.Errorf("volume %s state %q, want Ready", v.Id, v.State)
		}
		got[v.Id] = v.Deviceid
	}
	if want := map[string]int64{"11111111-0000-4000-8000-000000000001": 0, attached: 1}; !maps.Equal(got, want) {
		t.Fatalf("volumes of the VM: %v, want %v", got, want)
	}
	v, _, err := cs.Volume.GetVolumeByID(detached)
	if err != nil {
		t.Fatal(err)
	}
	if v.Virtualmachineid != "" || v.Size != 2<<30 || v.Type != "DATADISK" {
		t.Fatalf("detached volume: vm %q size %d type %q", v.Virtualmachineid, v.Size, v.Type)
	}
	if _, text := attach(t, cs, detached, vm, -1); text != "" {
		t.Fatalf("attach the detached volume: %s", text)
	}
	if v, _, err = cs.Volume.GetVolumeByID(detached); err != nil || v.Virtualmachineid != vm || v.Deviceid != 2 {
		t.Fatalf("attached: vm %q device %d (%v), want %s device 2", v.Virtualmachineid, v.Deviceid, err, vm)
	}
}

// TestPersistenceAcrossRestart: a job pending at Close finishes after a
// restart on the same state directory, and state and counters survive.
func TestPersistenceAcrossRestart(t *testing.T) {
	dir := t.TempDir()
	cfg := cloudsim.Config{Listen: "127.0.0.1:0", StateDir: dir, LocalDevices: cloudsim.LocalDevicesOff, JobDuration: 20 * time.Millisecond}
	s1, err := cloudsim.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := s1.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	cs := syncClient(s1)
	created, err := cs.Volume.CreateVolume(createParams(cs, "persist", 2))
	if err != nil {
		t.Fatal(err)
	}
	waitJob(t, cs, created.JobID)
	vol := created.Id
	goneJob, err := cs.Volume.CreateVolume(createParams(cs, "expunged-job", 1))
	if err != nil {
		t.Fatal(err)
	}
	waitJob(t, cs, goneJob.JobID)
	if !s1.ExpungeJob(goneJob.JobID) {
		t.Fatal("ended job not expunged")
	}
	if err := s1.SetFaults(cloudsim.Faults{JobDuration: map[string]cloudsim.Duration{"attachVolume": cloudsim.Duration(300 * time.Millisecond)}}); err != nil {
		t.Fatal(err)
	}
	r, err := cs.Volume.AttachVolume(cs.Volume.NewAttachVolumeParams(vol, cloudsim.RemoteVMID))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s1.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s1.Close(ctx); err != nil {
		t.Fatalf("second close: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "state.json")); err != nil {
		t.Fatal(err)
	}

	s2 := startSim(t, cfg)
	cs2 := syncClient(s2)
	if j := waitJob(t, cs2, r.JobID); j.Jobstatus != 1 {
		t.Fatalf("resumed job: %s", j.Jobresult)
	}
	v, _, err := cs2.Volume.GetVolumeByID(vol)
	if err != nil || v.Name != "persist" || v.Deviceid != 1 || v.Virtualmachineid != cloudsim.RemoteVMID {
		t.Fatalf("after restart = %+v, %v", v, err)
	}
	if got := s2.Stats().AttachesSucceeded[vol]; got != 1 {
		t.Fatalf("attaches after restart = %d", got)
	}
	// Ended jobs are kept in files of their own: one still answers, an
	// expunged one stays gone.
	if j := waitJob(t, cs2, created.JobID); j.Jobstatus != 1 || !strings.Contains(string(j.Jobresult), vol) {
		t.Fatalf("ended job after restart: %d %s", j.Jobstatus, j.Jobresult)
	}
	p := cs2.Asyncjob.NewQueryAsyncJobResultParams(goneJob.JobID)
	if _, err := cs2.Asyncjob.QueryAsyncJobResult(p); err == nil || !strings.Contains(err.Error(), "431") {
		t.Fatalf("expunged job after restart: %v, want a 431", err)
	}
}
