package kinds

import (
	"context"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/engine"
)

// tags makes a volume's CloudStack tags exactly the requested set: it
// lists them, deletes those that differ and creates those missing. Each
// call is made only after a listing shows it is still needed, so nothing
// is written twice.
type tags struct{ Deps }

func (tags) Type() commands.OpType { return commands.OpTags }

func (k tags) Execute(ctx context.Context, j *engine.Journal) (*commands.OpResponse, error) {
	var req commands.TagsRequest
	if err := j.Decode(&req); err != nil {
		return nil, err
	}
	if err := k.setTags(ctx, j, req.VolumeID, req.Tags, true); err != nil {
		return nil, err
	}
	return &commands.OpResponse{VolumeID: req.VolumeID, Message: "Volume tags set"}, nil
}

// setTags gives a volume the tags want: exactly these when exact, else
// these besides the ones it has (a create's metadata). Deletes come
// first, then creates; each is computed from a fresh listing.
func (d Deps) setTags(ctx context.Context, j *engine.Journal, volumeID string, want map[string]string, exact bool) error {
	current := func(ctx context.Context) (map[string]string, error) {
		vol, err := d.volume(ctx, j, volumeID)
		if err != nil {
			return nil, notFoundOr(err, volumeID)
		}
		return vol.Tags, nil
	}
	phases := []struct {
		name, requested, job string
		part                 func(have map[string]string) map[string]string
		send                 func(ctx context.Context, part map[string]string) (string, error)
	}{
		{"deleteTags", StepTagsDeleteRequested, StepTagsDeleteJob, func(have map[string]string) map[string]string {
			if !exact {
				return nil
			}
			return TagsToDelete(have, want)
		}, func(ctx context.Context, part map[string]string) (string, error) {
			return d.CloudStack.DeleteTags(ctx, volumeID, part)
		}},
		{"createTags", StepTagsCreateRequested, StepTagsCreateJob, func(have map[string]string) map[string]string {
			return TagsToCreate(have, want)
		}, func(ctx context.Context, part map[string]string) (string, error) {
			return d.CloudStack.CreateTags(ctx, volumeID, part)
		}},
	}
	for _, p := range phases {
		have, err := current(ctx)
		if err != nil {
			return err
		}
		part := p.part(have)
		if len(part) == 0 && j.Op.Step != p.job {
			continue
		}
		err = asyncCall{
			name: p.name, requested: p.requested, job: p.job,
			done: func(ctx context.Context) (bool, error) {
				have, err := current(ctx)
				if err != nil {
					return false, err
				}
				// A part still needed is computed again before it is sent.
				part = p.part(have)
				return len(part) == 0, nil
			},
			send: func(ctx context.Context) (string, error) { return p.send(ctx, part) },
		}.run(ctx, d, j)
		if err != nil {
			return err
		}
	}
	return nil
}

// TagsToDelete are the tags of have that want does not hold as they are.
func TagsToDelete(have, want map[string]string) map[string]string {
	out := map[string]string{}
	for k, v := range have {
		if w, ok := want[k]; !ok || w != v {
			out[k] = v
		}
	}
	return out
}

// TagsToCreate are the tags of want that have does not hold as they are.
func TagsToCreate(have, want map[string]string) map[string]string {
	out := map[string]string{}
	for k, v := range want {
		if h, ok := have[k]; !ok || h != v {
			out[k] = v
		}
	}
	return out
}
