// Package csapi is volumed's narrow interface to CloudStack: the few calls
// the handlers make, returning volumed's own types, with every error
// classified once as retryable or final.
package csapi

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// ErrNotFound: CloudStack does not know the volume, VM or job.
var ErrNotFound = errors.New("cloudstack: not found")

// Volume is a CloudStack volume as volumed needs it.
type Volume struct {
	// ID is the volume's CloudStack UUID.
	ID string `json:"id"`
	// Name is the volume's name.
	Name string `json:"name"`
	// State is CloudStack's volume state, e.g. "Allocated" or "Ready".
	State string `json:"state"`
	// Type is the volume type, e.g. "ROOT" or "DATADISK".
	Type string `json:"type"`
	// ZoneID is the zone the volume is in.
	ZoneID string `json:"zoneid,omitempty"`
	// ZoneName is the name of the zone the volume is in.
	ZoneName string `json:"zonename,omitempty"`
	// Size is in bytes.
	Size int64 `json:"size"`
	// VMID is the VM the volume is attached to, "" when detached.
	VMID string `json:"virtualmachineid,omitempty"`
	// VMName is the name of the VM the volume is attached to, "" when detached.
	VMName string `json:"vmname,omitempty"`
	// DeviceID is the volume's device id on its VM, nil when detached.
	DeviceID *int64 `json:"deviceid,omitempty"`
	// Attached is when the volume was attached, "" when detached.
	Attached string `json:"attached,omitempty"`
	// Created is when the volume was created, in TimeLayout.
	Created string `json:"created,omitempty"`
	// SnapshotID is the snapshot the volume was created from, if any.
	SnapshotID string `json:"snapshotid,omitempty"`
	// Tags are the volume's resource tags, key to value; nil when none.
	Tags map[string]string `json:"tags,omitempty"`
}

// Snapshot is a CloudStack volume snapshot.
type Snapshot struct {
	// ID is the snapshot's CloudStack UUID.
	ID string `json:"id"`
	// Name is the snapshot's name.
	Name string `json:"name"`
	// VolumeID is the volume the snapshot was taken of.
	VolumeID string `json:"volumeid"`
	// State is CloudStack's snapshot state: "Creating" while it is taken,
	// "BackedUp" when usable, "Error" when taking it failed.
	State string `json:"state"`
	// Size is the volume's size at the snapshot, in bytes.
	Size int64 `json:"size"`
	// ZoneID is the zone of the snapshot's volume.
	ZoneID string `json:"zoneid,omitempty"`
	// Created is when the snapshot was taken, in TimeLayout.
	Created string `json:"created,omitempty"`
}

// Snapshot states that matter to volumed.
const (
	SnapshotBackedUp = "BackedUp"
	SnapshotError    = "Error"
)

// TimeLayout is CloudStack's timestamp format (Volume.Created, Attached).
const TimeLayout = "2006-01-02T15:04:05-0700"

// VM is a CloudStack virtual machine.
type VM struct {
	// ID is the VM's CloudStack UUID.
	ID string `json:"id"`
	// Name is the VM's name.
	Name string `json:"name"`
	// State is CloudStack's VM state, e.g. "Running" or "Stopped".
	State string `json:"state"`
	// ZoneID is the zone the VM is in.
	ZoneID string `json:"zoneid,omitempty"`
}

// Zone is a CloudStack zone.
type Zone struct {
	// ID is the zone's CloudStack UUID.
	ID string `json:"id"`
	// Name is the zone's name.
	Name string `json:"name"`
}

// DiskOffering is a CloudStack disk offering.
type DiskOffering struct {
	// ID is the offering's CloudStack UUID.
	ID string `json:"id"`
	// Name is the offering's name.
	Name string `json:"name"`
}

// JobStatus is an async job's jobstatus.
type JobStatus int

// Job statuses as CloudStack numbers them.
const (
	JobPending JobStatus = 0
	JobSuccess JobStatus = 1
	JobFailure JobStatus = 2
)

// Job is the state of a CloudStack async job.
type Job struct {
	// ID is the async job's id.
	ID string
	// Status is JobPending until the job ends in JobSuccess or JobFailure.
	Status JobStatus
	// Volume is the job's volume result, when it has one.
	Volume *Volume
	// Snapshot is the job's snapshot result (createSnapshot,
	// revertSnapshot), when it has one.
	Snapshot *Snapshot
	// VM is the job's VM result (startVirtualMachine,
	// stopVirtualMachine), when it has one.
	VM *VM
	// Err is the job's failure as a final *Error, when Status is JobFailure.
	Err error
}

// CreateParams are the parameters of createVolume.
type CreateParams struct {
	// Name is the new volume's name.
	Name string
	// SizeGiB is the size in GiB for a custom disk offering; 0 sends none.
	SizeGiB int64
	// DiskOfferingID is the disk offering to create the volume from.
	DiskOfferingID string
	// ZoneID is the zone to create the volume in.
	ZoneID string
	// SnapshotID creates the volume from this snapshot, with its data;
	// SizeGiB, DiskOfferingID and ZoneID are then optional (CloudStack
	// takes the snapshot's).
	SnapshotID string
}

// ListFilter selects volumes; empty fields match all.
type ListFilter struct {
	// VMID selects the volumes attached to this VM.
	VMID string
	// Name selects the volumes of this name.
	Name string
	// ZoneID selects the volumes in this zone.
	ZoneID string
	// Tags selects the volumes that have every one of these tags (keys and
	// values compared without case, as CloudStack does).
	Tags map[string]string
}

// SnapshotParams are createSnapshot's parameters.
type SnapshotParams struct {
	// VolumeID is the volume to snapshot.
	VolumeID string
	// Name is the snapshot's name; "" lets CloudStack name it.
	Name string
	// Quiesce sends quiescevm=true; CloudStack's default snapshot strategy
	// (every storage but managed storage) refuses it, failing the job with
	// 530.
	Quiesce bool
}

// SnapshotFilter selects snapshots; empty fields match all. Destroyed
// snapshots are never listed.
type SnapshotFilter struct {
	// ID selects one snapshot.
	ID string
	// VolumeID selects the snapshots of this volume.
	VolumeID string
	// Name selects the snapshots of this name.
	Name string
}

// API is what volumed asks of CloudStack. Async commands return the job id;
// WaitJob follows a job to its end.
type API interface {
	// CreateVolume starts creating a volume.
	CreateVolume(ctx context.Context, p CreateParams) (volumeID, jobID string, err error)
	// AttachVolume attaches; deviceID nil lets CloudStack choose.
	AttachVolume(ctx context.Context, volumeID, vmID string, deviceID *int64) (jobID string, err error)
	// DetachVolume detaches a volume from its VM.
	DetachVolume(ctx context.Context, volumeID string) (jobID string, err error)
	// DeleteVolume deletes a volume; it is synchronous (no job).
	DeleteVolume(ctx context.Context, volumeID string) error
	// ResizeVolume starts resizing a volume to sizeGiB; a smaller size needs
	// shrinkOK.
	ResizeVolume(ctx context.Context, volumeID string, sizeGiB int64, shrinkOK bool) (jobID string, err error)
	// CreateSnapshot starts a snapshot of a volume.
	CreateSnapshot(ctx context.Context, p SnapshotParams) (snapshotID, jobID string, err error)
	// ListSnapshots returns the snapshots f selects, newest first as
	// CloudStack lists them (SnapshotManagerImpl orders by created,
	// descending).
	ListSnapshots(ctx context.Context, f SnapshotFilter) ([]Snapshot, error)
	// GetSnapshot returns a snapshot or an error wrapping ErrNotFound
	// (also for a deleted one).
	GetSnapshot(ctx context.Context, snapshotID string) (Snapshot, error)
	// DeleteSnapshot starts deleting a snapshot.
	DeleteSnapshot(ctx context.Context, snapshotID string) (jobID string, err error)
	// RevertSnapshot starts reverting the snapshot's volume to it (the
	// volume detached or its VM stopped).
	RevertSnapshot(ctx context.Context, snapshotID string) (jobID string, err error)
	// CreateTags starts adding tags to a volume; a key it already has fails
	// the job.
	CreateTags(ctx context.Context, volumeID string, tags map[string]string) (jobID string, err error)
	// DeleteTags starts removing these tags (key and value) from a volume;
	// a job that finds none of them fails. tags must not be empty
	// (CloudStack would delete every tag).
	DeleteTags(ctx context.Context, volumeID string, tags map[string]string) (jobID string, err error)
	// StartVM starts a VM.
	StartVM(ctx context.Context, vmID string) (jobID string, err error)
	// StopVM stops a VM; forced stops it without the guest's consent.
	StopVM(ctx context.Context, vmID string, forced bool) (jobID string, err error)
	// GetVolume returns a volume or an error wrapping ErrNotFound.
	GetVolume(ctx context.Context, volumeID string) (Volume, error)
	// ListVolumes returns the volumes f selects.
	ListVolumes(ctx context.Context, f ListFilter) ([]Volume, error)
	// GetVM returns a VM or an error wrapping ErrNotFound.
	GetVM(ctx context.Context, vmID string) (VM, error)
	// ListZones lists every zone.
	ListZones(ctx context.Context) ([]Zone, error)
	// ListDiskOfferings lists every disk offering.
	ListDiskOfferings(ctx context.Context) ([]DiskOffering, error)
	// ListVMs lists every VM.
	ListVMs(ctx context.Context) ([]VM, error)
	// QueryJob asks once for a job's state.
	QueryJob(ctx context.Context, jobID string) (Job, error)
	// WaitJob polls a job on a short adaptive interval (first poll at once,
	// then growing to at most 100 ms) until it ends or ctx is done. A failed
	// job returns the job and its final error.
	WaitJob(ctx context.Context, jobID string) (Job, error)
	// Ping checks CloudStack answers with valid credentials.
	Ping(ctx context.Context) error
	// Calls counts the API calls made so far.
	Calls() int64
}

// Error is a CloudStack failure, classified once.
type Error struct {
	// Command is the API command that failed, e.g. "attachVolume".
	Command string
	// Code is CloudStack's errorcode (431, 530, …), 0 for transport errors.
	Code int
	// CSCode is the cserrorcode (4350, 9999), when given.
	CSCode int
	// Text is CloudStack's errortext, or the transport error.
	Text string
	// Retryable: the call may be sent again as it is. True for a call
	// that never reached CloudStack (refused, reset before the request was
	// written), for 530 (a few times: RetryLimit), for HTTP 429 and 503 (after
	// RetryAfter) and for a proxy's 5xx; for reads also for a connection
	// lost or timed out after the request was written. Never for a failed
	// job, a 4xx or 531–537.
	Retryable bool
	// MaybeDone: a side-effecting call (create, attach, detach, delete,
	// resize, snapshot, revert, tags, start, stop) reached CloudStack and its answer was lost (the connection dropped
	// after the request was written, or the call timed out). CloudStack may
	// have done it: the caller must ask CloudStack, never send it again.
	MaybeDone bool
	// RetryLimit bounds how many times in a row a Retryable error of this
	// kind is retried (530); 0 means until the caller's deadline.
	RetryLimit int
	// RetryAfter is the delay the answer asked for (HTTP Retry-After), 0
	// when none.
	RetryAfter time.Duration
	// Err is the underlying error, if any.
	Err error
}

var _ error = (*Error)(nil)

// Error names the command, CloudStack's code and its text.
func (e *Error) Error() string {
	if e.Code == 0 {
		return fmt.Sprintf("cloudstack %s: %s", e.Command, e.Text)
	}
	return fmt.Sprintf("cloudstack %s: error %d: %s", e.Command, e.Code, e.Text)
}

// Unwrap returns the underlying error.
func (e *Error) Unwrap() error { return e.Err }

// IsRetryable reports whether err is a CloudStack error worth retrying.
func IsRetryable(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.Retryable
}

// IsMaybeDone reports whether err is a lost answer to a side-effecting
// call that CloudStack may have carried out.
func IsMaybeDone(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.MaybeDone
}
