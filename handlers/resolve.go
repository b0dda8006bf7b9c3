package handlers

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/state"
)

// resolvePage is how many failed operations one store read of
// resolveJobs lists.
const resolvePage = 200

// resolveBudget bounds resolveJobs inside a reconcile, so that a slow
// CloudStack leaves the rest of the reconcile its time.
const resolveBudget = commands.ForceSyncTimeout / 4

// reconciler repairs what drifted from CloudStack: the timed-out jobs'
// operations, and the mappings (the Service's reconcile runs it under its
// lease).
type reconciler struct {
	cfg      Config
	log      *slog.Logger
	mappings *engine.MappingWriter
	release  *engine.Releaser
	pub      engine.Publisher
	// kind returns the kind of an operation type, a Resolver where its
	// operations wait for CloudStack jobs.
	kind func(commands.OpType) engine.Kind
}

// resolveJobs finishes the story of the failed operations whose CloudStack
// job may still run (details job_may_run true, left by waitJob on
// TIMEOUT): it lists the failed operations page by page and asks
// CloudStack, once and without waiting, about the job of each that says
// so. A job still running is looked at again by the next reconcile. A job
// that ended, or that CloudStack no longer knows, is resolved (see
// resolveJob). It returns a sentence per resolved operation, and one per
// operation or page it could not check. It stops at the first CloudStack
// or store that does not answer, and within resolveBudget: what is left
// waits for the next reconcile.
func (r *reconciler) resolveJobs(ctx context.Context) (changes, errs []string) {
	ctx, cancel := context.WithTimeout(ctx, resolveBudget)
	defer cancel()
	f := state.Filter{Status: commands.StatusFailed, Limit: resolvePage}
	for {
		ops, next, err := r.cfg.Store.ListOperations(ctx, f)
		if err != nil {
			return changes, append(errs, fmt.Sprintf("failed operations: %v", state.APIError(err)))
		}
		for _, op := range ops {
			if op.Details[commands.DetailJobMayRun] != true {
				continue
			}
			change, err := r.resolveJob(ctx, op)
			if change != "" {
				changes = append(changes, change)
			}
			if err != nil {
				errs = append(errs, fmt.Sprintf("job of operation %s: %v", op.ID, err))
				if commands.AsError(err).Status == http.StatusServiceUnavailable || ctx.Err() != nil {
					return changes, append(errs, "timed-out jobs: the others wait for the next reconcile")
				}
			}
		}
		if next == "" {
			return changes, errs
		}
		f.Cursor = next
	}
}

// resolveJob asks CloudStack about the job of one failed operation. A job
// that ended is adopted as CloudStack's truth: a create that succeeded
// names its volume; an attach that succeeded gets its mapping (resolved
// before the mappings are reconciled, which also find its device); a
// detach that succeeded loses its mapping and export when the mappings
// are reconciled next, in the same sync; a job that failed did nothing. A
// job CloudStack no longer knows is decided from the volume's state where
// it shows the operation's effect, and is unknown otherwise. Nothing is
// ever sent to CloudStack again. The outcome is recorded on the operation
// (job_may_run false, job_status, resolved_at, resolution) by
// compare-and-swap and published; "" and no error when the job still runs
// or the operation changed since it was listed (the next reconcile reads
// it again).
func (r *reconciler) resolveJob(ctx context.Context, op commands.Operation) (string, error) {
	k, _ := r.kind(op.Type).(engine.Resolver)
	res, err := engine.ResolveJob(ctx, k, op, engine.VolumeLook(r.cfg.CloudStack, r.cfg.Store, op), r.cfg.CloudStack.QueryJob)
	if err != nil || res.Pending {
		return "", err
	}
	return r.annotate(ctx, op, res)
}

// annotate records res on the failed operation op by compare-and-swap and
// publishes it. It returns the change in words, "" when the operation
// changed since it was listed.
func (r *reconciler) annotate(ctx context.Context, op commands.Operation, res engine.Resolution) (string, error) {
	jobID, out, adopted := res.JobID, res.Outcome, res.Adopted
	saved, err := r.cfg.Store.UpdateOperation(ctx, res.Record(op, time.Now().UTC()))
	if errors.Is(err, state.ErrStale) {
		return adopted, nil // changed since listed: the next reconcile reads it again
	}
	if err != nil {
		return adopted, state.APIError(err)
	}
	r.pub.PublishOperation(ctx, saved)
	r.log.Info("timed-out job resolved", "operation_id", op.ID, "type", op.Type, "volume_id", op.VolumeID,
		"cloudstack_job_id", jobID, "job_status", out.Status)
	change := fmt.Sprintf("operation %s (%s of volume %s) timed out on CloudStack job %s: %s", op.ID, op.Type, op.VolumeID, jobID, out.Resolution)
	if adopted != "" {
		change += "; " + adopted
	}
	return change, nil
}
