package client

import (
	"context"
	"iter"
	"maps"
	"net/http"
	"net/url"
	"slices"
	"strconv"

	"github.com/volumed/volumed/commands"
)

// Snapshot takes a snapshot of a volume (POST /volumes/{id}/snapshots);
// name "" names it after the operation. The completed operation's
// response carries the snapshot's id.
func (c *Client) Snapshot(ctx context.Context, volumeID, name string, opts ...CallOption) (commands.Operation, error) {
	body := map[string]string{}
	if name != "" {
		body["name"] = name
	}
	return c.command(ctx, http.MethodPost, "/volumes/"+vol(volumeID)+"/snapshots", body, opts)
}

// VolumeSnapshots lists a volume's snapshots, newest first
// (GET /volumes/{id}/snapshots).
func (c *Client) VolumeSnapshots(ctx context.Context, volumeID string) ([]commands.Snapshot, error) {
	var list []commands.Snapshot
	_, err := c.do(ctx, http.MethodGet, "/volumes/"+vol(volumeID)+"/snapshots", nil, &list)
	return list, err
}

// GetSnapshot returns one snapshot (GET /snapshots/{id}).
func (c *Client) GetSnapshot(ctx context.Context, snapshotID string) (commands.Snapshot, error) {
	var s commands.Snapshot
	_, err := c.do(ctx, http.MethodGet, "/snapshots/"+url.PathEscape(snapshotID), nil, &s)
	return s, err
}

// DeleteSnapshot deletes a snapshot (DELETE /snapshots/{id}).
func (c *Client) DeleteSnapshot(ctx context.Context, snapshotID string, opts ...CallOption) (commands.Operation, error) {
	return c.command(ctx, http.MethodDelete, "/snapshots/"+url.PathEscape(snapshotID), nil, opts)
}

// Revert reverts a volume to one of its snapshots
// (POST /volumes/{id}/revert).
func (c *Client) Revert(ctx context.Context, volumeID, snapshotID string, opts ...CallOption) (commands.Operation, error) {
	return c.command(ctx, http.MethodPost, "/volumes/"+vol(volumeID)+"/revert", map[string]string{"snapshot_id": snapshotID}, opts)
}

// Resize resizes a volume to size bytes; a smaller size needs shrinkOK
// (POST /volumes/{id}/resize).
func (c *Client) Resize(ctx context.Context, volumeID string, size int64, shrinkOK bool, opts ...CallOption) (commands.Operation, error) {
	return c.command(ctx, http.MethodPost, "/volumes/"+vol(volumeID)+"/resize", map[string]any{"size": size, "shrink_ok": shrinkOK}, opts)
}

// SetTags makes a volume's tags exactly tags (PUT /volumes/{id}/tags).
func (c *Client) SetTags(ctx context.Context, volumeID string, tags map[string]string, opts ...CallOption) (commands.Operation, error) {
	if tags == nil {
		tags = map[string]string{}
	}
	return c.command(ctx, http.MethodPut, "/volumes/"+vol(volumeID)+"/tags", map[string]any{"tags": tags}, opts)
}

// VolumeListOptions filter GET /volumes; zero fields do not filter.
type VolumeListOptions struct {
	// Tags keeps the volumes with every one of these tags.
	Tags map[string]string
	// VMID keeps the volumes attached to this VM; Name those of this name.
	VMID, Name string
	// Limit is the page size; 0 means the server's default.
	Limit int
	// Cursor continues after the page that returned it.
	Cursor string
}

func (o VolumeListOptions) query() url.Values {
	q := url.Values{}
	for _, k := range slices.Sorted(maps.Keys(o.Tags)) {
		q.Add("tag", k+"="+o.Tags[k])
	}
	for k, v := range map[string]string{"vm_id": o.VMID, "name": o.Name, "cursor": o.Cursor} {
		if v != "" {
			q.Set(k, v)
		}
	}
	if o.Limit > 0 {
		q.Set("limit", strconv.Itoa(o.Limit))
	}
	return q
}

// VolumePage is one page of GET /volumes, ordered by id.
type VolumePage struct {
	// Volumes are the page's rows.
	Volumes []commands.VolumeStatus
	// NextCursor continues the list (VolumeListOptions.Cursor); "" on the
	// last page.
	NextCursor string
}

// ListVolumes returns one page of volumes (GET /volumes).
func (c *Client) ListVolumes(ctx context.Context, o VolumeListOptions) (VolumePage, error) {
	path := "/volumes"
	if q := o.query().Encode(); q != "" {
		path += "?" + q
	}
	var p VolumePage
	resp, err := c.do(ctx, http.MethodGet, path, nil, &p.Volumes)
	if err != nil {
		return VolumePage{}, err
	}
	p.NextCursor = resp.Header.Get(commands.NextCursorHeader)
	return p, nil
}

// Volumes yields every volume matching o, page after page, until the last
// or until the caller stops. An error is yielded once, last.
func (c *Client) Volumes(ctx context.Context, o VolumeListOptions) iter.Seq2[commands.VolumeStatus, error] {
	return func(yield func(commands.VolumeStatus, error) bool) {
		for {
			page, err := c.ListVolumes(ctx, o)
			if err != nil {
				yield(commands.VolumeStatus{}, err)
				return
			}
			for _, v := range page.Volumes {
				if !yield(v, nil) {
					return
				}
			}
			if page.NextCursor == "" {
				return
			}
			o.Cursor = page.NextCursor
		}
	}
}
