package client

import (
	"context"
	"net/http"
	"net/url"

	"github.com/volumed/volumed/commands"
)

// Failover moves req's volumes onto the stopped VM req.VMID, the root as
// device 0, and starts it (POST /failovers): one operation of type
// failover. req is sent as it is, Test and StartVM included, so a zero
// Test asks for a live failover (no snapshots, no rollback) and a zero
// StartVM leaves the VM stopped: set both. The completed operation's
// response names the snapshots (Snapshots) and where each volume was
// (Before); a failed one says in Details whether what was done was undone
// (commands.DetailCompensated).
func (c *Client) Failover(ctx context.Context, req commands.FailoverRequest, opts ...CallOption) (commands.Operation, error) {
	return c.command(ctx, http.MethodPost, "/failovers", req, opts)
}

// Rollback puts the volumes of a completed test failover back where they
// were, with the content they had then (POST
// /failovers/{failoverID}/rollback): one operation of type rollback.
func (c *Client) Rollback(ctx context.Context, failoverID string, opts ...CallOption) (commands.Operation, error) {
	return c.command(ctx, http.MethodPost, "/failovers/"+url.PathEscape(failoverID)+"/rollback", nil, opts)
}
