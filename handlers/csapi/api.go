// Package csapi is volumed's narrow interface to CloudStack: the few calls
// the handlers make, returning volumed's own types, with every error
// classified once as retryable or final.
package csapi

import (
	"context"
	"errors"
	"fmt"
)

// ErrNotFound: CloudStack does not know the volume, VM or job.
var ErrNotFound = errors.New("cloudstack: not found")

// Volume is a CloudStack volume as volumed needs it.
type Volume struct {
	ID       string `json:"id"`
	Name     string `json:"name"`
	State    string `json:"state"`
	Type     string `json:"type"`
	ZoneID   string `json:"zoneid,omitempty"`
	ZoneName string `json:"zonename,omitempty"`
	// Size is in bytes.
	Size int64 `json:"size"`
	// VMID is the VM the volume is attached to, "" when detached.
	VMID     string `json:"virtualmachineid,omitempty"`
	VMName   string `json:"vmname,omitempty"`
	DeviceID *int64 `json:"deviceid,omitempty"`
	Attached string `json:"attached,omitempty"`
	Created  string `json:"created,omitempty"`
}

// VM is a CloudStack virtual machine.
type VM struct {
	ID     string `json:"id"`
	Name   string `json:"name"`
	State  string `json:"state"`
	ZoneID string `json:"zoneid,omitempty"`
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
	ID     string
	Status JobStatus
	// Volume is the job's volume result, when it has one.
	Volume *Volume
	// Err is the job's failure as a final *Error, when Status is JobFailure.
	Err error
}

// CreateParams are the parameters of createVolume.
type CreateParams struct {
	Name           string
	SizeGiB        int64
	DiskOfferingID string
	ZoneID         string
}

// ListFilter selects volumes; empty fields match all.
type ListFilter struct {
	VMID   string
	Name   string
	ZoneID string
}

// API is what volumed asks of CloudStack. Async commands return the job id;
// WaitJob follows a job to its end.
type API interface {
	CreateVolume(ctx context.Context, p CreateParams) (volumeID, jobID string, err error)
	// AttachVolume attaches; deviceID nil lets CloudStack choose.
	AttachVolume(ctx context.Context, volumeID, vmID string, deviceID *int64) (jobID string, err error)
	DetachVolume(ctx context.Context, volumeID string) (jobID string, err error)
	DeleteVolume(ctx context.Context, volumeID string) error
	// GetVolume returns a volume or an error wrapping ErrNotFound.
	GetVolume(ctx context.Context, volumeID string) (Volume, error)
	ListVolumes(ctx context.Context, f ListFilter) ([]Volume, error)
	// GetVM returns a VM or an error wrapping ErrNotFound.
	GetVM(ctx context.Context, vmID string) (VM, error)
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
	// Retryable: transport errors, timeouts and 5xx answers to the HTTP
	// call; never a failed job and never a 4xx.
	Retryable bool
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
