package cloudsim

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
)

// Fixed ids of the default inventory.
const (
	// ZoneID is the zone "OSSEA-Zone".
	ZoneID = "057e86db-c726-4d8c-ab1f-75c5f55d1881"
	// CustomOfferingID is the custom-size disk offering.
	CustomOfferingID = "c813c642-d946-49e1-9289-c616dd70206a"
	// FixedOfferingID is the fixed-size (10 GB) disk offering.
	FixedOfferingID = "5e1b9d3a-7c4f-4b2e-8a61-0f9d2c3b4a51"
	// ApplianceVMID is the appliance VM volumed runs on (Running, root
	// disk at device 0, local devices).
	ApplianceVMID = "87654321-4321-4321-4321-210987654321"
	// ApplianceRootVolumeID is the appliance's root volume.
	ApplianceRootVolumeID = "a0f1c2d3-0000-4000-8000-000000000001"
	// RemoteVMID is a Running VM on another host, with a root disk.
	RemoteVMID = "2b7e6c1d-5f4a-4e3b-9c8d-7a6b5c4d3e2f"
	// RemoteRootVolumeID is the remote VM's root volume.
	RemoteRootVolumeID = "a0f1c2d3-0000-4000-8000-000000000002"
	// TestVMID is a Stopped test-failover VM without a root disk.
	TestVMID = "9d8c7b6a-1e2f-4a3b-8c7d-6e5f4a3b2c1d"
	// DefaultAPIKey is the API key accepted when Config.APIKey is empty.
	DefaultAPIKey = "cloudsim-api-key"
	// DefaultSecretKey is the secret key used when Config.SecretKey is empty.
	DefaultSecretKey = "cloudsim-secret-key"
	// DefaultMaxDataDisks is CloudStack's default data-disk limit per VM.
	DefaultMaxDataDisks = 6
)

// Inventory is the fixed part of the simulated cloud: zones, disk offerings
// and VMs. Volumes are created through the API.
type Inventory struct {
	// Zones are the zones of the cloud.
	Zones []Zone `json:"zones"`
	// DiskOfferings are the offerings createVolume accepts.
	DiskOfferings []DiskOffering `json:"diskofferings"`
	// VMs are the virtual machines, with their root volumes.
	VMs []VM `json:"vms"`
	// Volumes are data volumes present at start, detached or attached to
	// a VM without local devices; the others are created through the API.
	Volumes []DataVolume `json:"volumes,omitempty"`
	// MaxDataDisks is the data-disk limit per VM; 0 means DefaultMaxDataDisks.
	MaxDataDisks int `json:"maxdatadisks,omitempty"`
}

// Zone is a CloudStack zone.
type Zone struct {
	// ID is the zone's UUID.
	ID string `json:"id"`
	// Name is the zone's name, e.g. "OSSEA-Zone".
	Name string `json:"name"`
}

// DiskOffering is a disk offering; Custom offerings take a size on createVolume.
type DiskOffering struct {
	// ID is the offering's UUID.
	ID string `json:"id"`
	// Name is the offering's name.
	Name string `json:"name"`
	// Custom marks a custom-size offering.
	Custom bool `json:"iscustomized"`
	// SizeGB is the size of a fixed offering.
	SizeGB int64 `json:"disksize"`
}

// VM is a virtual machine of the inventory.
type VM struct {
	// ID is the VM's UUID.
	ID string `json:"id"`
	// Name is the VM's name.
	Name string `json:"name"`
	// ZoneID is the zone the VM is in.
	ZoneID string `json:"zoneid"`
	// State is the initial state, "Running" or "Stopped".
	State string `json:"state"`
	// RootVolume is the VM's root disk at device 0; nil for none.
	RootVolume *RootVolume `json:"rootvolume,omitempty"`
	// LocalDevices: attaching to this VM creates a loop device on this host.
	LocalDevices bool `json:"localdevices"`
}

// RootVolume is a VM's root disk.
type RootVolume struct {
	// ID is the root volume's UUID.
	ID string `json:"id"`
	// SizeGB is the root disk's size in GiB.
	SizeGB int64 `json:"sizegb"`
}

// DataVolume is a data volume of the inventory, Ready.
type DataVolume struct {
	// ID is the volume's UUID.
	ID string `json:"id"`
	// Name is the volume's name.
	Name string `json:"name"`
	// ZoneID is the zone the volume is in.
	ZoneID string `json:"zoneid"`
	// SizeGB is the volume's size in GiB.
	SizeGB int64 `json:"sizegb"`
	// VMID is the VM the volume is attached to, at DeviceID; "" for none.
	VMID string `json:"vmid,omitempty"`
	// DeviceID is the volume's device on VMID: 1 or more, not 3 (the
	// CD-ROM's), one volume each.
	DeviceID int64 `json:"deviceid,omitempty"`
}

// DefaultInventory returns the built-in inventory; see the package constants.
func DefaultInventory() *Inventory {
	return &Inventory{
		Zones: []Zone{{ID: ZoneID, Name: "OSSEA-Zone"}},
		DiskOfferings: []DiskOffering{
			{ID: CustomOfferingID, Name: "Custom", Custom: true},
			{ID: FixedOfferingID, Name: "Small 10GB", SizeGB: 10},
		},
		VMs: []VM{
			{ID: ApplianceVMID, Name: "volumed-appliance", ZoneID: ZoneID, State: vmRunning,
				RootVolume: &RootVolume{ID: ApplianceRootVolumeID, SizeGB: 20}, LocalDevices: true},
			{ID: RemoteVMID, Name: "remote-vm", ZoneID: ZoneID, State: vmRunning,
				RootVolume: &RootVolume{ID: RemoteRootVolumeID, SizeGB: 20}},
			{ID: TestVMID, Name: "test-failover-vm", ZoneID: ZoneID, State: vmStopped},
		},
		MaxDataDisks: DefaultMaxDataDisks,
	}
}

// ErrBadInventory is wrapped by inventory validation errors.
var ErrBadInventory = errors.New("cloudsim: bad inventory")

// LoadInventory reads and validates an inventory JSON file.
func LoadInventory(path string) (*Inventory, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read inventory: %w", err)
	}
	var inv Inventory
	if err := json.Unmarshal(b, &inv); err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrBadInventory, path, err)
	}
	if err := inv.Validate(); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &inv, nil
}

// Validate checks ids are UUIDs and unique, VMs reference known zones and
// have a valid state.
func (inv *Inventory) Validate() error {
	seen := map[string]bool{}
	add := func(kind, id string) error {
		if !isUUID(id) {
			return fmt.Errorf("%w: %s id %q is not a UUID", ErrBadInventory, kind, id)
		}
		if seen[id] {
			return fmt.Errorf("%w: duplicate id %s", ErrBadInventory, id)
		}
		seen[id] = true
		return nil
	}
	if len(inv.Zones) == 0 {
		return fmt.Errorf("%w: no zones", ErrBadInventory)
	}
	zones := map[string]bool{}
	for _, z := range inv.Zones {
		if err := add("zone", z.ID); err != nil {
			return err
		}
		zones[z.ID] = true
	}
	for _, o := range inv.DiskOfferings {
		if err := add("disk offering", o.ID); err != nil {
			return err
		}
		if !o.Custom && o.SizeGB <= 0 {
			return fmt.Errorf("%w: fixed offering %s needs disksize > 0", ErrBadInventory, o.ID)
		}
	}
	for _, vm := range inv.VMs {
		if err := add("vm", vm.ID); err != nil {
			return err
		}
		if !zones[vm.ZoneID] {
			return fmt.Errorf("%w: vm %s in unknown zone %q", ErrBadInventory, vm.ID, vm.ZoneID)
		}
		if vm.State != vmRunning && vm.State != vmStopped {
			return fmt.Errorf("%w: vm %s state %q is not Running or Stopped", ErrBadInventory, vm.ID, vm.State)
		}
		if vm.RootVolume != nil {
			if err := add("root volume", vm.RootVolume.ID); err != nil {
				return err
			}
		}
	}
	if inv.MaxDataDisks < 0 {
		return fmt.Errorf("%w: maxdatadisks %d < 0", ErrBadInventory, inv.MaxDataDisks)
	}
	return inv.validateVolumes(add, zones)
}

// validateVolumes checks the data volumes: known zones, a size, and an
// attachment to a known VM of their zone without local devices, on a
// device of their own within the VM's data-disk limit.
func (inv *Inventory) validateVolumes(add func(kind, id string) error, zones map[string]bool) error {
	vms := make(map[string]VM, len(inv.VMs))
	for _, vm := range inv.VMs {
		vms[vm.ID] = vm
	}
	devices := map[string]map[int64]bool{}
	for _, v := range inv.Volumes {
		if err := add("volume", v.ID); err != nil {
			return err
		}
		switch {
		case !zones[v.ZoneID]:
			return fmt.Errorf("%w: volume %s in unknown zone %q", ErrBadInventory, v.ID, v.ZoneID)
		case v.SizeGB <= 0:
			return fmt.Errorf("%w: volume %s needs sizegb > 0", ErrBadInventory, v.ID)
		case v.VMID == "" && v.DeviceID != 0:
			return fmt.Errorf("%w: volume %s has a deviceid but no vmid", ErrBadInventory, v.ID)
		case v.VMID == "":
			continue
		}
		vm, ok := vms[v.VMID]
		switch {
		case !ok:
			return fmt.Errorf("%w: volume %s attached to unknown vm %q", ErrBadInventory, v.ID, v.VMID)
		case vm.ZoneID != v.ZoneID:
			return fmt.Errorf("%w: volume %s and its vm %s in different zones", ErrBadInventory, v.ID, v.VMID)
		case vm.LocalDevices:
			return fmt.Errorf("%w: volume %s attached to vm %s with local devices (attach it through the API)", ErrBadInventory, v.ID, v.VMID)
		case v.DeviceID < 1 || v.DeviceID == 3:
			return fmt.Errorf("%w: volume %s deviceid %d: want 1, 2 or 4 and up", ErrBadInventory, v.ID, v.DeviceID)
		case devices[v.VMID][v.DeviceID]:
			return fmt.Errorf("%w: volume %s: deviceid %d of vm %s taken", ErrBadInventory, v.ID, v.DeviceID, v.VMID)
		}
		if devices[v.VMID] == nil {
			devices[v.VMID] = map[int64]bool{}
		}
		devices[v.VMID][v.DeviceID] = true
		if len(devices[v.VMID]) > inv.maxDataDisks() {
			return fmt.Errorf("%w: vm %s has more than %d data volumes", ErrBadInventory, v.VMID, inv.maxDataDisks())
		}
	}
	return nil
}

func (inv *Inventory) maxDataDisks() int {
	if inv.MaxDataDisks == 0 {
		return DefaultMaxDataDisks
	}
	return inv.MaxDataDisks
}

func (inv *Inventory) zone(id string) (Zone, bool) {
	for _, z := range inv.Zones {
		if z.ID == id {
			return z, true
		}
	}
	return Zone{}, false
}

func (inv *Inventory) offering(id string) (DiskOffering, bool) {
	for _, o := range inv.DiskOfferings {
		if o.ID == id {
			return o, true
		}
	}
	return DiskOffering{}, false
}

func (inv *Inventory) vm(id string) (VM, bool) {
	for _, v := range inv.VMs {
		if v.ID == id {
			return v, true
		}
	}
	return VM{}, false
}
