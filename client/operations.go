package client

import (
	"context"
	"iter"
	"net/http"
	"net/url"
	"strconv"

	"github.com/volumed/volumed/commands"
)

// ListOptions filter GET /operations; zero fields do not filter.
type ListOptions struct {
	// Type, Status, VolumeID, VMID and RequestedBy keep only the
	// matching operations.
	Type        commands.OpType
	Status      commands.OpStatus
	VolumeID    string
	VMID        string
	RequestedBy string
	// Limit is the page size; 0 means the server's default.
	Limit int
	// Cursor continues after the page that returned it.
	Cursor string
}

// query is o as URL query parameters.
func (o ListOptions) query() url.Values {
	q := url.Values{}
	for k, v := range map[string]string{"type": string(o.Type), "status": string(o.Status),
		"volume_id": o.VolumeID, "vm_id": o.VMID, "requested_by": o.RequestedBy, "cursor": o.Cursor} {
		if v != "" {
			q.Set(k, v)
		}
	}
	if o.Limit > 0 {
		q.Set("limit", strconv.Itoa(o.Limit))
	}
	return q
}

// OperationPage is one page of GET /operations, newest first.
type OperationPage struct {
	// Operations are the page's rows.
	Operations []commands.OperationSummary
	// NextCursor continues the list (ListOptions.Cursor); "" on the last
	// page. A page short of the limit, even empty, may have one.
	NextCursor string
}

// ListOperations returns one page of operations, newest first.
func (c *Client) ListOperations(ctx context.Context, o ListOptions) (OperationPage, error) {
	path := "/operations"
	if q := o.query().Encode(); q != "" {
		path += "?" + q
	}
	var p OperationPage
	resp, err := c.do(ctx, http.MethodGet, path, nil, &p.Operations)
	if err != nil {
		return OperationPage{}, err
	}
	p.NextCursor = resp.Header.Get(commands.NextCursorHeader)
	return p, nil
}

// Operations yields every operation matching o, newest first, reading
// page after page (of o.Limit, or the server's default) until the last or
// until the caller stops. An error is yielded once, last.
func (c *Client) Operations(ctx context.Context, o ListOptions) iter.Seq2[commands.OperationSummary, error] {
	return func(yield func(commands.OperationSummary, error) bool) {
		for {
			page, err := c.ListOperations(ctx, o)
			if err != nil {
				yield(commands.OperationSummary{}, err)
				return
			}
			for _, op := range page.Operations {
				if !yield(op, nil) {
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
