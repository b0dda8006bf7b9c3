package handlers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/handlers/csapi"
)

// Steps recorded on an operation, so a redelivery after a crash knows
// what was already asked of CloudStack.
const (
	stepCreateRequested = "create:requested"
	stepCreateJob       = "create:job"
	stepAttachRequested = "attach:requested"
	stepAttachJob       = "attach:job"
	stepCorrelate       = "attach:correlate"
	stepDetachRequested = "detach:requested"
	stepDetachJob       = "detach:job"
	stepRelease         = "detach:release"
	stepUnexport        = "detach:unexport"
	stepDelete          = "delete:requested"
)

// errStopped: the service is shutting down or the store failed; the
// operation is left as recorded and resumed on redelivery.
var errStopped = errors.New("handlers: stopped before the operation ended")

// run executes one operation to a terminal state. It returns false when it
// stopped early and the job must be delivered again.
func (s *Service) run(opID string, log *slog.Logger) bool {
	ctx := s.ctx
	op, err := s.cfg.Store.GetOperation(ctx, opID)
	if err != nil {
		log.Warn("cannot load operation", "error", err)
		return false
	}
	if op.Status.Terminal() {
		return true
	}
	op.Attempts++
	op.Status = commands.StatusExecuting
	if err := s.save(ctx, &op); err != nil {
		return false
	}
	log = log.With("type", op.Type, "volume_id", op.VolumeID)
	log.Info("operation executing", "attempt", op.Attempts, "step", op.Step)
	var resp *commands.OpResponse
	switch op.Type {
	case commands.OpCreate:
		resp, err = s.create(ctx, &op)
	case commands.OpAttach:
		resp, err = s.attach(ctx, &op)
	case commands.OpDetach:
		resp, err = s.detach(ctx, &op)
	case commands.OpDelete:
		resp, err = s.delete(ctx, &op)
	case commands.OpExport:
		resp, err = s.exportOp(ctx, &op)
	case commands.OpUnexport:
		resp, err = s.unexportOp(ctx, &op)
	default:
		err = commands.Internal("unknown operation type %q", op.Type)
	}
	if ctx.Err() != nil || errors.Is(err, errStopped) {
		log.Info("operation interrupted; it resumes on redelivery", "step", op.Step)
		return false
	}
	status := commands.StatusCompleted
	if err != nil {
		status = commands.StatusFailed
		e := commands.AsError(err)
		op.Error = e.Message
		op.Details = map[string]any{"code": e.Code}
		for k, v := range e.Details {
			op.Details[k] = v
		}
	} else {
		op.Response, op.Error, op.Details = resp, "", nil
	}
	if !s.finish(ctx, &op, status) {
		return false
	}
	log.Info("operation "+string(status), "error", op.Error, "duration", op.Duration())
	return true
}

// finish records a terminal status; false if the store failed.
func (s *Service) finish(ctx context.Context, op *commands.Operation, status commands.OpStatus) bool {
	now := time.Now().UTC()
	op.Status, op.CompletedAt = status, &now
	return s.save(ctx, op) == nil
}

// save records the operation at the revision it was read or last saved
// at, and publishes its new state. A lost race (state.ErrStale) stops the
// run like a store failure: the redelivery reads the record again.
func (s *Service) save(ctx context.Context, op *commands.Operation) error {
	op.UpdatedAt = time.Now().UTC()
	saved, err := s.cfg.Store.UpdateOperation(ctx, *op)
	if err != nil {
		s.log.Warn("cannot record operation", "operation_id", op.ID, "error", err)
		return fmt.Errorf("%w: %w", errStopped, err)
	}
	op.Revision = saved.Revision
	s.publish(ctx, *op)
	return nil
}

// publish sends the operation's state on volumes.ops.<id>.
func (s *Service) publish(ctx context.Context, op commands.Operation) {
	data, err := json.Marshal(op)
	if err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := s.cfg.JetStream.Publish(ctx, commands.OpSubject(op.ID), data); err != nil {
		s.log.Warn("cannot publish operation event", "operation_id", op.ID, "error", err)
	}
}

// step runs fn under the step deadline, retrying transient CloudStack
// failures with exponential backoff and recording the last error on the
// operation. It returns a TIMEOUT error when the deadline passes.
func (s *Service) step(ctx context.Context, op *commands.Operation, name string, fn func(ctx context.Context) error) error {
	stepCtx, cancel := context.WithTimeout(ctx, s.cfg.StepTimeout)
	defer cancel()
	backoff := s.cfg.RetryMin
	for {
		err := fn(stepCtx)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return errStopped
		}
		if stepCtx.Err() != nil {
			return commands.Timeout("%s did not finish within %v: %v", name, s.cfg.StepTimeout, err).
				WithDetail("step", name)
		}
		if !csapi.IsRetryable(err) {
			return err
		}
		op.Error = fmt.Sprintf("%s: %v (retrying)", name, err)
		if err := s.save(ctx, op); err != nil {
			return err
		}
		select {
		case <-time.After(backoff):
		case <-stepCtx.Done():
		}
		backoff = min(2*backoff, s.cfg.RetryMax)
	}
}

// volume asks CloudStack for a volume inside a step.
func (s *Service) volume(ctx context.Context, op *commands.Operation, id string) (csapi.Volume, error) {
	var vol csapi.Volume
	err := s.step(ctx, op, "listVolumes", func(ctx context.Context) error {
		var err error
		vol, err = s.cfg.CloudStack.GetVolume(ctx, id)
		return err
	})
	return vol, err
}

// waitJob follows the operation's CloudStack job to its end.
func (s *Service) waitJob(ctx context.Context, op *commands.Operation, name string) (csapi.Job, error) {
	var job csapi.Job
	err := s.step(ctx, op, name, func(ctx context.Context) error {
		var err error
		job, err = s.cfg.CloudStack.WaitJob(ctx, op.JobID)
		return err
	})
	return job, err
}

// failure turns a CloudStack error into the operation's error.
func failure(err error) error {
	var cs *csapi.Error
	if errors.As(err, &cs) && !cs.Retryable {
		return cloudStackError(err)
	}
	return err
}

func decodeRequest(op *commands.Operation, v any) error {
	if err := json.Unmarshal(op.Request, v); err != nil {
		return commands.Internal("recorded request of %s is unreadable: %v", op.ID, err)
	}
	return nil
}
