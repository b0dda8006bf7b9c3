// Package client is a typed Go client of volumed's REST API (/api/v1), with
// the request and response types of package commands, errors as *Error,
// Wait on ?wait and Watch over NATS for operation events.
//
//	c, err := client.New("http://127.0.0.1:8090", client.WithToken(token))
//	op, err := c.CreateVolume(ctx, commands.CreateRequest{Name: "n", Size: 5 << 30,
//		DiskOfferingID: offering, ZoneID: zone})
//	op, err = c.Wait(ctx, op.ID) // terminal: completed, failed or cancelled
package client

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"

	"github.com/nats-io/nats.go"

	"github.com/volumed/volumed/commands"
)

// DefaultServer is where volumed serves its API by default.
const DefaultServer = "http://127.0.0.1:8090"

// basePath prefixes every API route.
const basePath = "/api/v1"

// maxResponseBytes bounds a response body the client reads.
const maxResponseBytes = 16 << 20

// Client calls one volumed. It is safe for concurrent use.
type Client struct {
	base  string // scheme://host[:port], no trailing slash
	http  *http.Client
	token string
	nc    *nats.Conn
}

// Option configures a Client.
type Option func(*Client)

// WithHTTPClient sends requests with hc instead of http.DefaultClient.
func WithHTTPClient(hc *http.Client) Option { return func(c *Client) { c.http = hc } }

// WithToken sends token as a bearer token (Authorization: Bearer …).
func WithToken(token string) Option { return func(c *Client) { c.token = token } }

// WithNATS gives Watch the NATS connection of volumed's bus.
func WithNATS(nc *nats.Conn) Option { return func(c *Client) { c.nc = nc } }

// CallOption configures one command call.
type CallOption func(*callOptions)

// callOptions are what CallOptions set.
type callOptions struct {
	idempotencyKey string
	force          bool
}

// WithIdempotencyKey sends key as the command's Idempotency-Key header: a
// command sent again with the same key and body answers the operation the
// first one started; with another body, 409 CONFLICT.
func WithIdempotencyKey(key string) CallOption {
	return func(o *callOptions) { o.idempotencyKey = key }
}

// WithForce sends {"force": true}: a detach or delete goes ahead although
// the volume is in use on its VM (mounted, held, open, or its NBD export
// with clients), cutting the export's clients. Only DetachVolume and
// DeleteVolume take it; see the operations documentation for its risks.
func WithForce() CallOption {
	return func(o *callOptions) { o.force = true }
}

// volumeBody is the body of a detach or delete.
type volumeBody struct {
	Force bool `json:"force,omitempty"`
}

// New returns a client of the volumed at server (scheme://host[:port],
// optionally ending in /api/v1); "" means DefaultServer.
func New(server string, opts ...Option) (*Client, error) {
	if server == "" {
		server = DefaultServer
	}
	u, err := url.Parse(server)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("client: server must be an http or https URL, got %q", server)
	}
	if u.RawQuery != "" || u.Fragment != "" {
		return nil, fmt.Errorf("client: server URL %q must not have a query or fragment", server)
	}
	base := strings.TrimSuffix(strings.TrimSuffix(u.String(), "/"), basePath)
	c := &Client{base: base, http: http.DefaultClient}
	for _, o := range opts {
		o(c)
	}
	return c, nil
}

// Server is the server URL the client calls, without /api/v1.
func (c *Client) Server() string { return c.base }

// do sends one request to path (below /api/v1, query included) with in as
// its JSON body (none when nil) and decodes a 2xx answer into out (unless
// nil). Any other answer is an *Error.
func (c *Client) do(ctx context.Context, method, path string, in, out any) (*http.Response, error) {
	return c.doWith(ctx, method, path, nil, in, out)
}

// doWith is do with extra request headers.
func (c *Client) doWith(ctx context.Context, method, path string, header http.Header, in, out any) (*http.Response, error) {
	var body io.Reader
	if in != nil {
		data, err := json.Marshal(in)
		if err != nil {
			return nil, fmt.Errorf("client: encode request: %w", err)
		}
		body = bytes.NewReader(data)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+basePath+path, body)
	if err != nil {
		return nil, fmt.Errorf("client: %w", err)
	}
	req.Header.Set("Accept", "application/json")
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	for name, values := range header {
		req.Header[name] = values
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("client: %s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxResponseBytes))
	if err != nil {
		return resp, fmt.Errorf("client: %s %s: read answer: %w", method, path, err)
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return resp, decodeError(resp, data)
	}
	if out == nil {
		return resp, nil
	}
	if raw, ok := out.(*[]byte); ok {
		*raw = data
		return resp, nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return resp, fmt.Errorf("client: %s %s: decode answer: %w", method, path, err)
	}
	return resp, nil
}

// command sends a command with its call options and returns the
// accepted operation.
func (c *Client) command(ctx context.Context, method, path string, in any, opts []CallOption) (commands.Operation, error) {
	var o callOptions
	for _, opt := range opts {
		opt(&o)
	}
	if _, ok := in.(volumeBody); o.force && !ok {
		return commands.Operation{}, fmt.Errorf("client: %s %s: WithForce applies to DetachVolume and DeleteVolume only", method, path)
	}
	header := http.Header{}
	if o.idempotencyKey != "" {
		header.Set(commands.IdempotencyKeyHeader, o.idempotencyKey)
	}
	var op commands.Operation
	_, err := c.doWith(ctx, method, path, header, in, &op)
	return op, err
}

// vol is the path segment of a volume id.
func vol(id string) string { return url.PathEscape(id) }

// CreateVolume asks for a new volume (POST /volumes).
func (c *Client) CreateVolume(ctx context.Context, req commands.CreateRequest, opts ...CallOption) (commands.Operation, error) {
	return c.command(ctx, http.MethodPost, "/volumes", req, opts)
}

// AttachVolume attaches a volume to a VM (POST /volumes/{id}/attach).
func (c *Client) AttachVolume(ctx context.Context, volumeID, vmID string, opts ...CallOption) (commands.Operation, error) {
	return c.command(ctx, http.MethodPost, "/volumes/"+vol(volumeID)+"/attach", map[string]string{"vm_id": vmID}, opts)
}

// AttachRoot attaches a volume as the root disk (device 0) of a stopped VM
// (POST /volumes/{id}/attach-root).
func (c *Client) AttachRoot(ctx context.Context, volumeID, vmID string, opts ...CallOption) (commands.Operation, error) {
	return c.command(ctx, http.MethodPost, "/volumes/"+vol(volumeID)+"/attach-root", map[string]string{"vm_id": vmID}, opts)
}

// DetachVolume detaches a volume from its VM (POST /volumes/{id}/detach);
// a volume in use is refused unless WithForce.
func (c *Client) DetachVolume(ctx context.Context, volumeID string, opts ...CallOption) (commands.Operation, error) {
	return c.command(ctx, http.MethodPost, "/volumes/"+vol(volumeID)+"/detach", forceBody(opts), opts)
}

// DeleteVolume deletes a volume (DELETE /volumes/{id}); a volume whose
// device is in use is refused unless WithForce.
func (c *Client) DeleteVolume(ctx context.Context, volumeID string, opts ...CallOption) (commands.Operation, error) {
	return c.command(ctx, http.MethodDelete, "/volumes/"+vol(volumeID), forceBody(opts), opts)
}

// forceBody is the body of a detach or delete with opts.
func forceBody(opts []CallOption) volumeBody {
	var o callOptions
	for _, opt := range opts {
		opt(&o)
	}
	return volumeBody{Force: o.force}
}

// GetVolume returns a volume's state, device and last operation
// (GET /volumes/{id}).
func (c *Client) GetVolume(ctx context.Context, volumeID string) (commands.VolumeStatus, error) {
	var v commands.VolumeStatus
	_, err := c.do(ctx, http.MethodGet, "/volumes/"+vol(volumeID), nil, &v)
	return v, err
}

// VolumeDevice returns a volume's device mapping (GET /volumes/{id}/device).
func (c *Client) VolumeDevice(ctx context.Context, volumeID string) (commands.Mapping, error) {
	var m commands.Mapping
	_, err := c.do(ctx, http.MethodGet, "/volumes/"+vol(volumeID)+"/device", nil, &m)
	return m, err
}

// DeviceVolume returns the mapping holding a device path ("/dev/vdb") of
// volumed's host, or of vmID when it is not "" (GET /devices/{path}/volume).
func (c *Client) DeviceVolume(ctx context.Context, devicePath, vmID string) (commands.Mapping, error) {
	path := "/devices/" + url.PathEscape(strings.TrimPrefix(devicePath, "/")) + "/volume"
	if vmID != "" {
		path += "?" + url.Values{"vm_id": {vmID}}.Encode()
	}
	var m commands.Mapping
	_, err := c.do(ctx, http.MethodGet, path, nil, &m)
	return m, err
}

// VMVolumes lists the volumes attached to a VM (GET /vms/{id}/volumes).
func (c *Client) VMVolumes(ctx context.Context, vmID string) ([]commands.VolumeStatus, error) {
	var list []commands.VolumeStatus
	_, err := c.do(ctx, http.MethodGet, "/vms/"+url.PathEscape(vmID)+"/volumes", nil, &list)
	return list, err
}

// GetOperation returns one operation (GET /operations/{id}).
func (c *Client) GetOperation(ctx context.Context, opID string) (commands.Operation, error) {
	var op commands.Operation
	_, err := c.do(ctx, http.MethodGet, "/operations/"+url.PathEscape(opID), nil, &op)
	return op, err
}

// ForceSync reconciles CloudStack, mappings, devices and names now
// (POST /admin/force-sync).
func (c *Client) ForceSync(ctx context.Context) (commands.SyncResult, error) {
	var r commands.SyncResult
	_, err := c.do(ctx, http.MethodPost, "/admin/force-sync", nil, &r)
	return r, err
}

// Health returns the daemon's health (GET /health). An unhealthy daemon
// answers 503 with the same document: it is returned with a nil error, so
// read Health.Status.
func (c *Client) Health(ctx context.Context) (commands.Health, error) {
	var h commands.Health
	_, err := c.do(ctx, http.MethodGet, "/health", nil, &h)
	var e *Error
	if errors.As(err, &e) && e.Status == http.StatusServiceUnavailable && json.Unmarshal(e.Body, &h) == nil && h.Status != "" {
		return h, nil
	}
	return h, err
}

// Metrics returns the operation counts and call counters (GET /metrics).
func (c *Client) Metrics(ctx context.Context) (commands.Metrics, error) {
	var m commands.Metrics
	_, err := c.do(ctx, http.MethodGet, "/metrics", nil, &m)
	return m, err
}

// Exports lists the NBD exports of volumed's host (GET /exports).
func (c *Client) Exports(ctx context.Context) ([]commands.Export, error) {
	var list []commands.Export
	_, err := c.do(ctx, http.MethodGet, "/exports", nil, &list)
	return list, err
}

// Export returns one volume's NBD export (GET /exports/{id}).
func (c *Client) Export(ctx context.Context, volumeID string) (commands.Export, error) {
	var e commands.Export
	_, err := c.do(ctx, http.MethodGet, "/exports/"+vol(volumeID), nil, &e)
	return e, err
}

// CreateExport exports a volume attached to volumed's host over NBD
// (POST /exports).
func (c *Client) CreateExport(ctx context.Context, req commands.ExportRequest, opts ...CallOption) (commands.Operation, error) {
	return c.command(ctx, http.MethodPost, "/exports", req, opts)
}

// DeleteExport ends a volume's export (DELETE /exports/{id}).
func (c *Client) DeleteExport(ctx context.Context, volumeID string, opts ...CallOption) (commands.Operation, error) {
	return c.command(ctx, http.MethodDelete, "/exports/"+vol(volumeID), nil, opts)
}

// OpenAPI returns the OpenAPI document the daemon serves.
func (c *Client) OpenAPI(ctx context.Context) ([]byte, error) {
	var doc []byte
	_, err := c.do(ctx, http.MethodGet, "/openapi.json", nil, &doc)
	return doc, err
}
