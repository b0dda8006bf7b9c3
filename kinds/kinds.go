// Package kinds holds volumed's operation kinds, one file each: create,
// attach (attach-root too), detach, delete, export and unexport,
// snapshot, delete_snapshot, revert, resize and tags, the VM power steps
// start_vm and stop_vm, and the workflows failover and rollback. Each
// implements engine.Kind: it runs its operation as CloudStack steps that
// first ask whether the step is already done, journals each step through
// the engine's Journal, and writes mappings and exports only through the
// fenced writers the engine gives it.
package kinds

import (
	"context"
	"errors"
	"log/slog"
	"strconv"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/state"
)

// Steps recorded on an operation, so a redelivery after a crash knows
// what was already asked of CloudStack. The release steps are the
// engine's (engine.StepUnexport, engine.StepRelease).
const (
	StepCreateRequested = "create:requested"
	StepCreateJob       = "create:job"
	StepAttachRequested = "attach:requested"
	StepAttachJob       = "attach:job"
	StepCorrelate       = "attach:correlate"
	StepDetachRequested = "detach:requested"
	StepDetachJob       = "detach:job"
	StepDelete          = "delete:requested"

	StepSnapshotRequested       = "snapshot:requested"
	StepSnapshotJob             = "snapshot:job"
	StepDeleteSnapshotRequested = "delete_snapshot:requested"
	StepDeleteSnapshotJob       = "delete_snapshot:job"
	StepRevertRequested         = "revert:requested"
	StepRevertJob               = "revert:job"
	StepResizeRequested         = "resize:requested"
	StepResizeJob               = "resize:job"
	StepResizeDevice            = "resize:device"
	// The tag steps, of tags and of a create with metadata.
	StepTagsDeleteRequested = "tags:delete:requested"
	StepTagsDeleteJob       = "tags:delete:job"
	StepTagsCreateRequested = "tags:create:requested"
	StepTagsCreateJob       = "tags:create:job"
)

// Exports is the host work the export kinds and attach need: the export
// records and the NBD servers that serve them.
type Exports interface {
	engine.ExportEnder
	// ExportFor returns the export the volume's mapping allows, or a
	// CONFLICT saying why there is none.
	ExportFor(ctx context.Context, volumeID string) (commands.Export, error)
	// PutExport records e and has the volumed serving its VM serve it,
	// fenced by f.
	PutExport(ctx context.Context, f engine.Fence, e commands.Export) error
	// AutoExport has the volumed serving m's VM export it, read-only, when
	// that host's --nbd-auto-export asks for it, fenced by f.
	AutoExport(ctx context.Context, f engine.Fence, m commands.Mapping)
	// Record returns a volume's export record.
	Record(ctx context.Context, volumeID string) (commands.Export, error)
	// Ping checks that a volumed with an NBD server serves vmID.
	Ping(ctx context.Context, vmID string) error
	// Serving reports whether this instance runs an NBD server, and VMID
	// is the VM it is.
	Serving() bool
	VMID() string
}

// Deps are what the kinds work with.
type Deps struct {
	// CloudStack is the CloudStack API the steps call.
	CloudStack csapi.API
	// Operations lists operations (a create's adoption).
	Operations state.OperationReader
	// Mappings is the one mapping writer.
	Mappings *engine.MappingWriter
	// Release is the one release sequence.
	Release *engine.Releaser
	// Devices is the device agent side; nil without agents.
	Devices engine.Devices
	// Sizes follows a resized volume's device; nil without agents.
	Sizes DeviceSizes
	// Exports is the host work.
	Exports Exports
	// Catalog answers the pre-checks from CloudStack's cached lists.
	Catalog Catalog
	// StopGrace is how long stop_vm waits for a graceful stop before it
	// forces one; 0 means DefaultStopGrace.
	StopGrace time.Duration
	// Log receives the kinds' logs.
	Log *slog.Logger
}

// All returns every kind, for engine.New.
func All(d Deps) []engine.Kind {
	return []engine.Kind{create{d}, attach{d}, detach{d}, remove{d}, export{d}, unexport{d},
		snapshot{d}, deleteSnapshot{d}, revert{d}, resize{d}, tags{d},
		startVM{d}, stopVM{d}, failover{d}, rollback{d}}
}

// mark journals a step on the operation.
func mark(j *engine.Journal) func(ctx context.Context, step string) error {
	return func(ctx context.Context, step string) error {
		j.Op.Step = step
		return j.Save(ctx)
	}
}

// volume asks CloudStack for a volume inside a step.
func (d Deps) volume(ctx context.Context, j *engine.Journal, id string) (csapi.Volume, error) {
	var vol csapi.Volume
	err := j.Read(ctx, "listVolumes", func(ctx context.Context) error {
		var err error
		vol, err = d.CloudStack.GetVolume(ctx, id)
		return err
	})
	return vol, err
}

// waitJob follows the operation's CloudStack job to its end. A job still
// running at the step's deadline fails the operation with TIMEOUT saying
// so (job_may_run and the job's id); a later reconcile records what became
// of the job.
func (d Deps) waitJob(ctx context.Context, j *engine.Journal, name string) (csapi.Job, error) {
	var job csapi.Job
	err := j.Read(ctx, name, func(ctx context.Context) error {
		var err error
		job, err = d.CloudStack.WaitJob(ctx, j.Op.JobID)
		return err
	})
	var e *commands.Error
	if errors.As(err, &e) && e.Code == commands.CodeTimeout {
		return job, e.WithDetail(commands.DetailJobMayRun, true).WithDetail(commands.DetailJobID, j.Op.JobID)
	}
	return job, err
}

// lostAnswer makes a lost answer retryable, for a call that CloudStack
// shows was not done and that may be sent again.
func lostAnswer(err error) error {
	var cs *csapi.Error
	if !errors.As(err, &cs) || !cs.MaybeDone {
		return err
	}
	again := *cs
	again.MaybeDone, again.Retryable = false, true
	return &again
}

// notFoundOr maps a missing volume to engine.VolumeNotFound and anything
// else through engine.Failure.
func notFoundOr(err error, volumeID string) error {
	if errors.Is(err, csapi.ErrNotFound) {
		return engine.VolumeNotFound(volumeID)
	}
	return engine.Failure(err)
}

// DeviceString names a CloudStack device id for people.
func DeviceString(id *int64) string {
	if id == nil {
		return "unknown"
	}
	return strconv.FormatInt(*id, 10)
}
