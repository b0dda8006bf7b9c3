package kinds

import (
	"context"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/engine"
)

// export checks the volume's mapping again, writes its export record and
// has the volumed serving its VM serve it.
type export struct{ Deps }

func (export) Type() commands.OpType { return commands.OpExport }

func (k export) Execute(ctx context.Context, j *engine.Journal) (*commands.OpResponse, error) {
	var req commands.ExportRequest
	if err := j.Decode(&req); err != nil {
		return nil, err
	}
	e, err := k.Exports.ExportFor(ctx, req.VolumeID)
	if err != nil {
		return nil, err
	}
	e.ReadOnly = req.ReadOnly
	if err := k.Exports.PutExport(ctx, j, e); err != nil {
		return nil, err
	}
	return &commands.OpResponse{VolumeID: e.VolumeID, VMID: e.VMID, DevicePath: e.DevicePath, ExportName: e.ExportName,
		Message: "Volume exported as " + e.ExportName}, nil
}

// unexport ends a volume's export.
type unexport struct{ Deps }

func (unexport) Type() commands.OpType { return commands.OpUnexport }

func (k unexport) Execute(ctx context.Context, j *engine.Journal) (*commands.OpResponse, error) {
	var req commands.VolumeRequest
	if err := j.Decode(&req); err != nil {
		return nil, err
	}
	name, err := k.Exports.DropExport(ctx, j, req.VolumeID)
	if err != nil {
		return nil, err
	}
	resp := &commands.OpResponse{VolumeID: req.VolumeID, ExportName: name, Message: "Export " + name + " removed"}
	if name == "" {
		resp.Message = "Volume was not exported"
	}
	return resp, nil
}
