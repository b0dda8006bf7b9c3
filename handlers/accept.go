package handlers

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
	"time"

	"github.com/google/uuid"
	"github.com/nats-io/nats.go"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/handlers/csapi"
	"github.com/volumed/volumed/state"
)

func (s *Service) commandHandlers() map[string]nats.MsgHandler {
	return map[string]nats.MsgHandler{
		commands.SubjectCreate:     s.handle(s.acceptCreate),
		commands.SubjectAttach:     s.handle(func(ctx context.Context, d []byte) (any, error) { return s.acceptAttach(ctx, d, false) }),
		commands.SubjectAttachRoot: s.handle(func(ctx context.Context, d []byte) (any, error) { return s.acceptAttach(ctx, d, true) }),
		commands.SubjectDetach:     s.handle(func(ctx context.Context, d []byte) (any, error) { return s.acceptVolume(ctx, d, commands.OpDetach) }),
		commands.SubjectDelete:     s.handle(func(ctx context.Context, d []byte) (any, error) { return s.acceptVolume(ctx, d, commands.OpDelete) }),
		commands.SubjectExport:     s.handle(s.acceptExport),
		commands.SubjectUnexport:   s.handle(s.acceptUnexport),
		commands.SubjectForceSync:  s.handle(func(ctx context.Context, _ []byte) (any, error) { return s.Reconcile(ctx) }),
	}
}

// handle adapts a command function to a NATS request handler: the reply
// is the result JSON with status 201 (200 for force-sync), or the error
// JSON with its HTTP status, in the Status header.
func (s *Service) handle(fn func(ctx context.Context, data []byte) (any, error)) nats.MsgHandler {
	return func(msg *nats.Msg) {
		status, timeout := http.StatusCreated, commands.AcceptTimeout
		if msg.Subject == commands.SubjectForceSync {
			status, timeout = http.StatusOK, commands.ForceSyncTimeout
		}
		ctx, cancel := context.WithTimeout(s.ctx, timeout)
		defer cancel()
		result, err := fn(ctx, msg.Data)
		if err != nil {
			apiErr := commands.AsError(err)
			if apiErr.Status >= 500 {
				s.log.Error("command failed", "subject", msg.Subject, "error", err)
			}
			status, result = apiErr.Status, apiErr
		}
		body, _ := json.Marshal(result)
		if msg.Reply == "" {
			return
		}
		reply := nats.NewMsg(msg.Reply)
		reply.Header.Set(commands.StatusHeader, strconv.Itoa(status))
		reply.Data = body
		if err := msg.RespondMsg(reply); err != nil {
			s.log.Warn("reply failed", "subject", msg.Subject, "error", err)
		}
	}
}

func (s *Service) acceptCreate(ctx context.Context, data []byte) (any, error) {
	req, err := commands.DecodeCreate(data)
	if err != nil {
		return nil, err
	}
	return s.accept(ctx, commands.OpCreate, "", nil, req)
}

func (s *Service) acceptAttach(ctx context.Context, data []byte, root bool) (any, error) {
	req, err := commands.DecodeAttach(data, root)
	if err != nil {
		return nil, err
	}
	if err := s.checkVolume(ctx, req.VolumeID); err != nil {
		return nil, err
	}
	if _, err := s.cfg.CloudStack.GetVM(ctx, req.VMID); err != nil {
		if errors.Is(err, csapi.ErrNotFound) {
			return nil, commands.NotFound("VM %s not found in CloudStack", req.VMID).WithDetail("vm_id", req.VMID)
		}
		if !csapi.IsRetryable(err) {
			return nil, cloudStackError(err)
		}
	}
	vm := req.VMID
	return s.accept(ctx, commands.OpAttach, req.VolumeID, &vm, req)
}

func (s *Service) acceptVolume(ctx context.Context, data []byte, typ commands.OpType) (any, error) {
	req, err := commands.DecodeVolume(data)
	if err != nil {
		return nil, err
	}
	if err := s.checkVolume(ctx, req.VolumeID); err != nil {
		return nil, err
	}
	return s.accept(ctx, typ, req.VolumeID, nil, req)
}

// checkVolume answers 404 for a volume CloudStack does not know. When
// CloudStack cannot be reached the command is accepted all the same: the
// queue retries it.
func (s *Service) checkVolume(ctx context.Context, volumeID string) error {
	_, err := s.cfg.CloudStack.GetVolume(ctx, volumeID)
	switch {
	case err == nil || csapi.IsRetryable(err):
		return nil
	case errors.Is(err, csapi.ErrNotFound):
		return commands.NotFound("volume %s not found in CloudStack", volumeID).WithDetail("volume_id", volumeID)
	default:
		return cloudStackError(err)
	}
}

// accept records a pending operation, queues it and publishes its first
// event. A queue failure marks the operation failed and answers 503, so no
// accepted operation is left without a job.
func (s *Service) accept(ctx context.Context, typ commands.OpType, volumeID string, vmID *string, req any) (any, error) {
	raw, err := json.Marshal(req)
	if err != nil {
		return nil, commands.Internal("encode request: %v", err)
	}
	now := time.Now().UTC()
	op := commands.Operation{
		ID: "op-" + uuid.NewString(), Type: typ, Status: commands.StatusPending,
		VolumeID: volumeID, VMID: vmID, Request: raw, CreatedAt: now, UpdatedAt: now,
	}
	op, err = s.cfg.Store.CreateOperation(ctx, op)
	if err != nil {
		return nil, state.APIError(err)
	}
	s.publish(ctx, op) // before the job, so no event of its execution comes first
	if err := s.enqueue(ctx, op.ID); err != nil {
		s.log.Error("queue unavailable", "operation_id", op.ID, "error", err)
		op.Error = "could not queue the operation: " + err.Error()
		s.finish(ctx, &op, commands.StatusFailed)
		return nil, commands.Unavailable("command queue unavailable: %v", err).WithDetail("operation_id", op.ID)
	}
	s.log.Info("operation accepted", "operation_id", op.ID, "type", op.Type, "volume_id", op.VolumeID)
	return op, nil
}

// cloudStackError maps a final CloudStack failure to 422 CLOUDSTACK_ERROR
// (503 when CloudStack cannot be reached).
func cloudStackError(err error) error {
	var cs *csapi.Error
	if !errors.As(err, &cs) {
		return commands.Internal("cloudstack: %v", err)
	}
	if cs.Retryable {
		return commands.Unavailable("CloudStack unavailable: %s", cs.Text).WithDetail("cloudstack_message", cs.Text)
	}
	return commands.CloudStack("CloudStack %s failed: %s", cs.Command, cs.Text).
		WithDetail("cloudstack_error_code", cs.Code).WithDetail("cloudstack_message", cs.Text)
}
