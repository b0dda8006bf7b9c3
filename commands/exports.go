package commands

import "time"

// ExportActive is the status of an export being served.
const ExportActive = "active"

// Export is the record of one volume's NBD export on a host, as GET
// /exports shows it.
type Export struct {
	// VolumeID is the exported volume.
	VolumeID string `json:"volume_id"`
	// VMID is the host (CloudStack VM) serving the export.
	VMID string `json:"vm_id"`
	// ExportName is the NBD export name, the volume's persistent device
	// name.
	ExportName string `json:"export_name"`
	// DevicePath is the persistent path the export serves.
	DevicePath string `json:"device_path"`
	// ReadOnly refuses writes from NBD clients.
	ReadOnly bool `json:"read_only"`
	// Status is ExportActive.
	Status string `json:"status"`
	// Clients counts the connected NBD clients; filled on read from the
	// NBD server, never stored.
	Clients int `json:"clients"`
	// CreatedAt is when the export was first recorded (UTC).
	CreatedAt time.Time `json:"created_at"`
	// UpdatedAt is when the export record last changed (UTC).
	UpdatedAt time.Time `json:"updated_at"`
	// Revision is the stored record's revision, set by the state store on
	// every read and write; 0 writes a new export. Never serialized.
	Revision uint64 `json:"-"`
}

// ExportRequest is the request of POST /exports and volumes.cmd.export.
type ExportRequest struct {
	// VolumeID is the volume to export, a UUID ("vol-" prefix allowed).
	VolumeID string `json:"volume_id"`
	// ReadOnly is true unless the request says "read_only": false.
	ReadOnly bool `json:"read_only"`
}

// DecodeExport parses and validates an export request ({"volume_id",
// "read_only"}); read_only defaults to true.
func DecodeExport(data []byte) (ExportRequest, error) {
	var in struct {
		VolumeID string `json:"volume_id"`
		ReadOnly *bool  `json:"read_only"`
	}
	if err := decodeStrict(data, &in); err != nil {
		return ExportRequest{}, err
	}
	vol, err := NormalizeVolumeID(in.VolumeID)
	if err != nil {
		return ExportRequest{}, err
	}
	r := ExportRequest{VolumeID: vol, ReadOnly: true}
	if in.ReadOnly != nil {
		r.ReadOnly = *in.ReadOnly
	}
	return r, nil
}
