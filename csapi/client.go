package csapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptrace"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/apache/cloudstack-go/v2/cloudstack"

	"github.com/volumed/volumed/metrics/hooks"
)

// Defaults of Config.
const (
	DefaultHTTPTimeout = 30 * time.Second
	DefaultPollMin     = 10 * time.Millisecond
	DefaultPollMax     = 100 * time.Millisecond
	// listPageSize is the page size of list calls (CloudStack's default).
	listPageSize = 500
)

// Config configures a Client; zero fields take defaults.
type Config struct {
	// URL is the API endpoint, e.g. http://cloudstack:8080/client/api.
	URL string
	// APIKey and SecretKey sign every request.
	APIKey, SecretKey string
	// HTTPTimeout bounds one API call, body included (DefaultHTTPTimeout).
	HTTPTimeout time.Duration
	// PollMin and PollMax bound WaitJob's interval, half the time since
	// it began (DefaultPollMin, DefaultPollMax).
	PollMin, PollMax time.Duration
	// Logger is the parent logger (default: discard).
	Logger *slog.Logger
}

// Client implements API with the synchronous cloudstack-go client and its
// own job polling.
type Client struct {
	cfg       Config
	log       *slog.Logger
	transport *http.Transport
	pool      sync.Pool // of *pooledClient
	calls     atomic.Int64
}

var _ API = (*Client)(nil)

// New returns a Client for cfg with defaults filled in.
func New(cfg Config) *Client {
	if cfg.HTTPTimeout <= 0 {
		cfg.HTTPTimeout = DefaultHTTPTimeout
	}
	if cfg.PollMin <= 0 {
		cfg.PollMin = DefaultPollMin
	}
	if cfg.PollMax <= 0 {
		cfg.PollMax = DefaultPollMax
	}
	cfg.PollMax = max(cfg.PollMax, cfg.PollMin)
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxIdleConnsPerHost = 16
	return &Client{cfg: cfg, log: cfg.Logger.With("component", "csapi"), transport: tr}
}

// Calls counts the API calls made so far.
func (c *Client) Calls() int64 { return c.calls.Load() }

// callState is what one call's HTTP requests record that cloudstack-go
// does not report: the last HTTP status and Retry-After (when an answer is
// not CloudStack JSON), and whether the request was written to CloudStack
// at all.
type callState struct {
	ctx        context.Context
	status     int
	retryAfter string
	wrote      atomic.Bool
}

// callTransport sends the HTTP requests of a pooled cloudstack-go client
// under the call that holds it (cur, set by do before each call).
type callTransport struct {
	base http.RoundTripper
	cur  *callState
}

// RoundTrip sends req under the current call's context.
func (t *callTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	st := t.cur
	trace := &httptrace.ClientTrace{WroteRequest: func(info httptrace.WroteRequestInfo) {
		if info.Err == nil {
			st.wrote.Store(true)
		}
	}}
	resp, err := t.base.RoundTrip(req.WithContext(httptrace.WithClientTrace(st.ctx, trace)))
	if resp != nil {
		st.status, st.retryAfter = resp.StatusCode, resp.Header.Get("Retry-After")
	}
	return resp, err
}

// pooledClient is a cloudstack-go client with its transport, used by one
// call at a time: making one (a hundred services, a transport and a
// cookie jar cloudstack-go allocates and ours replaces) cost more than
// the call's own encoding.
type pooledClient struct {
	cs *cloudstack.CloudStackClient
	rt *callTransport
}

// client takes a pooled cloudstack-go client, or makes one.
func (c *Client) client() *pooledClient {
	if p, ok := c.pool.Get().(*pooledClient); ok {
		return p
	}
	rt := &callTransport{base: c.transport}
	// verifyssl is moot: the transport is ours and verifies TLS.
	cs := cloudstack.NewClient(c.cfg.URL, c.cfg.APIKey, c.cfg.SecretKey, true,
		cloudstack.WithHTTPClient(&http.Client{Transport: rt}))
	return &pooledClient{cs: cs, rt: rt}
}

// sideEffects lists the commands that change CloudStack: their lost
// answers are MaybeDone rather than retryable.
var sideEffects = map[string]bool{"createVolume": true, "attachVolume": true, "detachVolume": true, "deleteVolume": true,
	"resizeVolume": true, "createSnapshot": true, "deleteSnapshot": true, "revertSnapshot": true,
	"createTags": true, "deleteTags": true, "startVirtualMachine": true, "stopVirtualMachine": true}

// tagResourceType is the resource type of volume tags.
const tagResourceType = "Volume"

// do runs one cloudstack-go call under ctx and the HTTP timeout, counts it
// and classifies its error. cloudstack-go takes no context, so each call
// holds a sync client of its own (taken from a pool) whose HTTP client
// carries ctx; connections are shared through c.transport. cloudstack-go sends the side-effecting
// commands as POST, which net/http never sends twice by itself.
func do[T any](ctx context.Context, c *Client, command string, fn func(*cloudstack.CloudStackClient) (T, error)) (T, error) {
	ctx, cancel := context.WithTimeout(ctx, c.cfg.HTTPTimeout)
	defer cancel()
	c.calls.Add(1)
	st := &callState{ctx: ctx}
	p := c.client()
	p.rt.cur = st
	start := time.Now()
	res, err := fn(p.cs)
	p.rt.cur = nil
	c.pool.Put(p)
	hooks.CloudStackCall(command, time.Since(start), err)
	if err != nil {
		e := classify(command, err, answer{status: st.status, retryAfter: st.retryAfter,
			sent: st.wrote.Load(), sideEffect: sideEffects[command]})
		c.log.Debug("call failed", "command", command, "duration", time.Since(start),
			"code", e.Code, "retryable", e.Retryable, "maybe_done", e.MaybeDone, "err", e.Error())
		return res, e
	}
	c.log.Debug("call", "command", command, "duration", time.Since(start))
	return res, nil
}

// CreateVolume submits createVolume.
func (c *Client) CreateVolume(ctx context.Context, p CreateParams) (string, string, error) {
	r, err := do(ctx, c, "createVolume", func(cs *cloudstack.CloudStackClient) (*cloudstack.CreateVolumeResponse, error) {
		q := cs.Volume.NewCreateVolumeParams()
		q.SetName(p.Name)
		if p.DiskOfferingID != "" {
			q.SetDiskofferingid(p.DiskOfferingID)
		}
		if p.ZoneID != "" {
			q.SetZoneid(p.ZoneID)
		}
		if p.SizeGiB > 0 {
			q.SetSize(p.SizeGiB)
		}
		if p.SnapshotID != "" {
			q.SetSnapshotid(p.SnapshotID)
		}
		return cs.Volume.CreateVolume(q)
	})
	if err != nil {
		return "", "", err
	}
	return r.Id, r.JobID, nil
}

// AttachVolume submits attachVolume; a non-nil deviceID, 0 included, is sent.
func (c *Client) AttachVolume(ctx context.Context, volumeID, vmID string, deviceID *int64) (string, error) {
	r, err := do(ctx, c, "attachVolume", func(cs *cloudstack.CloudStackClient) (*cloudstack.AttachVolumeResponse, error) {
		q := cs.Volume.NewAttachVolumeParams(volumeID, vmID)
		if deviceID != nil {
			q.SetDeviceid(*deviceID)
		}
		return cs.Volume.AttachVolume(q)
	})
	if err != nil {
		return "", err
	}
	return r.JobID, nil
}

// DetachVolume submits detachVolume by volume id.
func (c *Client) DetachVolume(ctx context.Context, volumeID string) (string, error) {
	r, err := do(ctx, c, "detachVolume", func(cs *cloudstack.CloudStackClient) (*cloudstack.DetachVolumeResponse, error) {
		q := cs.Volume.NewDetachVolumeParams()
		q.SetId(volumeID)
		return cs.Volume.DetachVolume(q)
	})
	if err != nil {
		return "", err
	}
	return r.JobID, nil
}

// DeleteVolume runs the synchronous deleteVolume.
func (c *Client) DeleteVolume(ctx context.Context, volumeID string) error {
	r, err := do(ctx, c, "deleteVolume", func(cs *cloudstack.CloudStackClient) (*cloudstack.DeleteVolumeResponse, error) {
		return cs.Volume.DeleteVolume(cs.Volume.NewDeleteVolumeParams(volumeID))
	})
	if err != nil {
		return err
	}
	if !r.Success {
		return &Error{Command: "deleteVolume", Text: "not successful: " + r.Displaytext}
	}
	return nil
}

// GetVolume lists one volume by id.
func (c *Client) GetVolume(ctx context.Context, volumeID string) (Volume, error) {
	vols, err := c.listVolumes(ctx, func(q *cloudstack.ListVolumesParams) { q.SetId(volumeID) })
	if err != nil {
		return Volume{}, err
	}
	if len(vols) != 1 {
		return Volume{}, fmt.Errorf("cloudstack listVolumes: volume %s (%d listed): %w", volumeID, len(vols), ErrNotFound)
	}
	return vols[0], nil
}

// ListVolumes lists the volumes f selects, all pages. CloudStack lists
// the volumes with any of the tags; those without all of them are dropped
// here.
func (c *Client) ListVolumes(ctx context.Context, f ListFilter) ([]Volume, error) {
	vols, err := c.listVolumes(ctx, func(q *cloudstack.ListVolumesParams) {
		if len(f.Tags) > 0 {
			q.SetTags(f.Tags)
		}
		if f.VMID != "" {
			q.SetVirtualmachineid(f.VMID)
		}
		if f.Name != "" {
			q.SetName(f.Name)
		}
		if f.ZoneID != "" {
			q.SetZoneid(f.ZoneID)
		}
	})
	if err != nil || len(f.Tags) == 0 {
		return vols, err
	}
	return slices.DeleteFunc(vols, func(v Volume) bool { return !hasTags(v.Tags, f.Tags) }), nil
}

// hasTags reports whether have holds every tag of want, keys and values
// compared without case.
func hasTags(have, want map[string]string) bool {
	for k, v := range want {
		found := false
		for hk, hv := range have {
			if strings.EqualFold(hk, k) && strings.EqualFold(hv, v) {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// listVolumes pages through listVolumes with the parameters set sets.
func (c *Client) listVolumes(ctx context.Context, set func(*cloudstack.ListVolumesParams)) ([]Volume, error) {
	return listAll(ctx, c, "listVolumes", func(cs *cloudstack.CloudStackClient, page int) ([]Volume, int, error) {
		q := cs.Volume.NewListVolumesParams()
		set(q)
		r, err := cs.Volume.ListVolumes(paged(q, page))
		if err != nil {
			return nil, 0, err
		}
		return mapAll(r.Volumes, volumeFrom), r.Count, nil
	})
}

// volumeFrom maps cloudstack-go's volume. cloudstack-go reads an absent
// deviceid as 0, so the device id is taken only when the volume is
// attached (0 is then the root disk).
func volumeFrom(v *cloudstack.Volume) Volume {
	out := Volume{
		ID: v.Id, Name: v.Name, State: v.State, Type: v.Type,
		ZoneID: v.Zoneid, ZoneName: v.Zonename, Size: v.Size,
		VMID: v.Virtualmachineid, VMName: v.Vmname, Attached: v.Attached, Created: v.Created,
		SnapshotID: v.Snapshotid, Tags: tagsFrom(v.Tags),
	}
	if v.Virtualmachineid != "" {
		id := v.Deviceid
		out.DeviceID = &id
	}
	return out
}

// tagsFrom maps cloudstack-go's tags; nil when there are none.
func tagsFrom(tags []cloudstack.Tags) map[string]string {
	if len(tags) == 0 {
		return nil
	}
	m := make(map[string]string, len(tags))
	for _, t := range tags {
		m[t.Key] = t.Value
	}
	return m
}

// ResizeVolume submits resizeVolume.
func (c *Client) ResizeVolume(ctx context.Context, volumeID string, sizeGiB int64, shrinkOK bool) (string, error) {
	r, err := do(ctx, c, "resizeVolume", func(cs *cloudstack.CloudStackClient) (*cloudstack.ResizeVolumeResponse, error) {
		q := cs.Volume.NewResizeVolumeParams(volumeID)
		q.SetSize(sizeGiB)
		if shrinkOK {
			q.SetShrinkok(true)
		}
		return cs.Volume.ResizeVolume(q)
	})
	if err != nil {
		return "", err
	}
	return r.JobID, nil
}

// CreateSnapshot submits createSnapshot; quiescevm is sent only when
// p.Quiesce.
func (c *Client) CreateSnapshot(ctx context.Context, p SnapshotParams) (string, string, error) {
	r, err := do(ctx, c, "createSnapshot", func(cs *cloudstack.CloudStackClient) (*cloudstack.CreateSnapshotResponse, error) {
		q := cs.Snapshot.NewCreateSnapshotParams(p.VolumeID)
		if p.Name != "" {
			q.SetName(p.Name)
		}
		if p.Quiesce {
			q.SetQuiescevm(true)
		}
		return cs.Snapshot.CreateSnapshot(q)
	})
	if err != nil {
		return "", "", err
	}
	return r.Id, r.JobID, nil
}

// ListSnapshots lists the snapshots f selects, all pages.
func (c *Client) ListSnapshots(ctx context.Context, f SnapshotFilter) ([]Snapshot, error) {
	return listAll(ctx, c, "listSnapshots", func(cs *cloudstack.CloudStackClient, page int) ([]Snapshot, int, error) {
		q := cs.Snapshot.NewListSnapshotsParams()
		if f.ID != "" {
			q.SetId(f.ID)
		}
		if f.VolumeID != "" {
			q.SetVolumeid(f.VolumeID)
		}
		if f.Name != "" {
			q.SetName(f.Name)
		}
		r, err := cs.Snapshot.ListSnapshots(paged(q, page))
		if err != nil {
			return nil, 0, err
		}
		return mapAll(r.Snapshots, snapshotFrom), r.Count, nil
	})
}

// GetSnapshot lists one snapshot by id.
func (c *Client) GetSnapshot(ctx context.Context, snapshotID string) (Snapshot, error) {
	snaps, err := c.ListSnapshots(ctx, SnapshotFilter{ID: snapshotID})
	if err != nil {
		return Snapshot{}, err
	}
	if len(snaps) != 1 {
		return Snapshot{}, fmt.Errorf("cloudstack listSnapshots: snapshot %s (%d listed): %w", snapshotID, len(snaps), ErrNotFound)
	}
	return snaps[0], nil
}

// snapshotFrom maps cloudstack-go's snapshot.
func snapshotFrom(s *cloudstack.Snapshot) Snapshot {
	return Snapshot{ID: s.Id, Name: s.Name, VolumeID: s.Volumeid, State: s.State, Size: s.Virtualsize,
		ZoneID: s.Zoneid, Created: s.Created}
}

// DeleteSnapshot submits deleteSnapshot.
func (c *Client) DeleteSnapshot(ctx context.Context, snapshotID string) (string, error) {
	r, err := do(ctx, c, "deleteSnapshot", func(cs *cloudstack.CloudStackClient) (*cloudstack.DeleteSnapshotResponse, error) {
		return cs.Snapshot.DeleteSnapshot(cs.Snapshot.NewDeleteSnapshotParams(snapshotID))
	})
	if err != nil {
		return "", err
	}
	return r.JobID, nil
}

// RevertSnapshot submits revertSnapshot.
func (c *Client) RevertSnapshot(ctx context.Context, snapshotID string) (string, error) {
	r, err := do(ctx, c, "revertSnapshot", func(cs *cloudstack.CloudStackClient) (*cloudstack.RevertSnapshotResponse, error) {
		return cs.Snapshot.RevertSnapshot(cs.Snapshot.NewRevertSnapshotParams(snapshotID))
	})
	if err != nil {
		return "", err
	}
	return r.JobID, nil
}

// CreateTags submits createTags on a volume.
func (c *Client) CreateTags(ctx context.Context, volumeID string, tags map[string]string) (string, error) {
	r, err := do(ctx, c, "createTags", func(cs *cloudstack.CloudStackClient) (*cloudstack.CreateTagsResponse, error) {
		return cs.Resourcetags.CreateTags(cs.Resourcetags.NewCreateTagsParams([]string{volumeID}, tagResourceType, tags))
	})
	if err != nil {
		return "", err
	}
	return r.JobID, nil
}

// ErrNoTags is returned by DeleteTags for an empty tag set.
var ErrNoTags = errors.New("cloudstack deleteTags: no tags given (CloudStack would delete every tag)")

// DeleteTags submits deleteTags on a volume.
func (c *Client) DeleteTags(ctx context.Context, volumeID string, tags map[string]string) (string, error) {
	if len(tags) == 0 {
		return "", ErrNoTags
	}
	r, err := do(ctx, c, "deleteTags", func(cs *cloudstack.CloudStackClient) (*cloudstack.DeleteTagsResponse, error) {
		q := cs.Resourcetags.NewDeleteTagsParams([]string{volumeID}, tagResourceType)
		q.SetTags(tags)
		return cs.Resourcetags.DeleteTags(q)
	})
	if err != nil {
		return "", err
	}
	return r.JobID, nil
}

// StartVM submits startVirtualMachine.
func (c *Client) StartVM(ctx context.Context, vmID string) (string, error) {
	r, err := do(ctx, c, "startVirtualMachine", func(cs *cloudstack.CloudStackClient) (*cloudstack.StartVirtualMachineResponse, error) {
		return cs.VirtualMachine.StartVirtualMachine(cs.VirtualMachine.NewStartVirtualMachineParams(vmID))
	})
	if err != nil {
		return "", err
	}
	return r.JobID, nil
}

// StopVM submits stopVirtualMachine.
func (c *Client) StopVM(ctx context.Context, vmID string, forced bool) (string, error) {
	r, err := do(ctx, c, "stopVirtualMachine", func(cs *cloudstack.CloudStackClient) (*cloudstack.StopVirtualMachineResponse, error) {
		q := cs.VirtualMachine.NewStopVirtualMachineParams(vmID)
		if forced {
			q.SetForced(true)
		}
		return cs.VirtualMachine.StopVirtualMachine(q)
	})
	if err != nil {
		return "", err
	}
	return r.JobID, nil
}

// GetVM lists one VM by id.
func (c *Client) GetVM(ctx context.Context, vmID string) (VM, error) {
	r, err := do(ctx, c, "listVirtualMachines", func(cs *cloudstack.CloudStackClient) (*cloudstack.ListVirtualMachinesResponse, error) {
		q := cs.VirtualMachine.NewListVirtualMachinesParams()
		q.SetId(vmID)
		return cs.VirtualMachine.ListVirtualMachines(q)
	})
	if err != nil {
		return VM{}, err
	}
	if len(r.VirtualMachines) != 1 {
		return VM{}, fmt.Errorf("cloudstack listVirtualMachines: vm %s (%d listed): %w", vmID, len(r.VirtualMachines), ErrNotFound)
	}
	return vmFrom(r.VirtualMachines[0]), nil
}

func vmFrom(vm *cloudstack.VirtualMachine) VM {
	return VM{ID: vm.Id, Name: vm.Name, State: vm.State, ZoneID: vm.Zoneid}
}

// ListZones lists every zone, all pages.
func (c *Client) ListZones(ctx context.Context) ([]Zone, error) {
	return listAll(ctx, c, "listZones", func(cs *cloudstack.CloudStackClient, page int) ([]Zone, int, error) {
		r, err := cs.Zone.ListZones(paged(cs.Zone.NewListZonesParams(), page))
		if err != nil {
			return nil, 0, err
		}
		return mapAll(r.Zones, func(z *cloudstack.Zone) Zone { return Zone{ID: z.Id, Name: z.Name} }), r.Count, nil
	})
}

// ListDiskOfferings lists every disk offering, all pages.
func (c *Client) ListDiskOfferings(ctx context.Context) ([]DiskOffering, error) {
	return listAll(ctx, c, "listDiskOfferings", func(cs *cloudstack.CloudStackClient, page int) ([]DiskOffering, int, error) {
		r, err := cs.DiskOffering.ListDiskOfferings(paged(cs.DiskOffering.NewListDiskOfferingsParams(), page))
		if err != nil {
			return nil, 0, err
		}
		return mapAll(r.DiskOfferings, func(o *cloudstack.DiskOffering) DiskOffering {
			return DiskOffering{ID: o.Id, Name: o.Name}
		}), r.Count, nil
	})
}

// ListVMs lists every VM, all pages.
func (c *Client) ListVMs(ctx context.Context) ([]VM, error) {
	return listAll(ctx, c, "listVirtualMachines", func(cs *cloudstack.CloudStackClient, page int) ([]VM, int, error) {
		r, err := cs.VirtualMachine.ListVirtualMachines(paged(cs.VirtualMachine.NewListVirtualMachinesParams(), page))
		if err != nil {
			return nil, 0, err
		}
		return mapAll(r.VirtualMachines, vmFrom), r.Count, nil
	})
}

// pager is the paging of a list command's parameters.
type pager interface {
	SetPage(int)
	SetPagesize(int)
}

// paged sets page number page of listPageSize items on q.
func paged[P pager](q P, page int) P {
	q.SetPage(page)
	q.SetPagesize(listPageSize)
	return q
}

// mapAll maps every item of in.
func mapAll[S, T any](in []S, f func(S) T) []T {
	out := make([]T, len(in))
	for i, v := range in {
		out[i] = f(v)
	}
	return out
}

// listAll pages through a list command: fetch returns one page and the
// total count CloudStack reports.
func listAll[T any](ctx context.Context, c *Client, command string, fetch func(cs *cloudstack.CloudStackClient, page int) ([]T, int, error)) ([]T, error) {
	type page struct {
		items []T
		count int
	}
	var out []T
	for n := 1; ; n++ {
		p, err := do(ctx, c, command, func(cs *cloudstack.CloudStackClient) (page, error) {
			items, count, err := fetch(cs, n)
			return page{items, count}, err
		})
		if err != nil {
			return nil, err
		}
		out = append(out, p.items...)
		if len(p.items) < listPageSize || len(out) >= p.count {
			return out, nil
		}
	}
}

// Ping lists zones: it needs valid credentials and a working API.
func (c *Client) Ping(ctx context.Context) error {
	_, err := do(ctx, c, "listZones", func(cs *cloudstack.CloudStackClient) (*cloudstack.ListZonesResponse, error) {
		return cs.Zone.ListZones(cs.Zone.NewListZonesParams())
	})
	return err
}

// QueryJob asks once for a job's state and parses its result. It goes
// through cloudstack-go's CustomService: AsyncjobService.QueryAsyncJobResult
// retries every error three times with 500 ms sleeps that no context can
// cut short, which would hide errors from WaitJob and delay cancellation.
func (c *Client) QueryJob(ctx context.Context, jobID string) (Job, error) {
	r, err := do(ctx, c, "queryAsyncJobResult", func(cs *cloudstack.CloudStackClient) (*cloudstack.QueryAsyncJobResultResponse, error) {
		custom, ok := cs.Custom.(*cloudstack.CustomService)
		if !ok {
			return nil, fmt.Errorf("cloudstack-go: Custom is %T, not *CustomService", cs.Custom)
		}
		var p cloudstack.CustomServiceParams
		p.SetParam("jobid", jobID)
		var r cloudstack.QueryAsyncJobResultResponse
		return &r, custom.CustomRequest("queryAsyncJobResult", &p, &r)
	})
	if err != nil {
		return Job{ID: jobID}, err
	}
	return parseJob(jobID, r)
}

// parseJob turns a queryAsyncJobResult answer into a Job.
func parseJob(jobID string, r *cloudstack.QueryAsyncJobResultResponse) (Job, error) {
	job := Job{ID: jobID, Status: JobStatus(r.Jobstatus)}
	switch job.Status {
	case JobPending:
	case JobSuccess:
		var res struct {
			Volume   *cloudstack.Volume         `json:"volume"`
			Snapshot *cloudstack.Snapshot       `json:"snapshot"`
			VM       *cloudstack.VirtualMachine `json:"virtualmachine"`
		}
		if len(r.Jobresult) > 0 {
			if err := json.Unmarshal(r.Jobresult, &res); err != nil {
				return job, &Error{Command: "queryAsyncJobResult", Text: "job " + jobID + " result: " + err.Error(), Err: err}
			}
		}
		if res.Volume != nil {
			v := volumeFrom(res.Volume)
			job.Volume = &v
		}
		if res.Snapshot != nil {
			sn := snapshotFrom(res.Snapshot)
			job.Snapshot = &sn
		}
		if res.VM != nil {
			vm := vmFrom(res.VM)
			job.VM = &vm
		}
	case JobFailure:
		job.Err = jobError(r)
	default:
		return job, &Error{Command: "queryAsyncJobResult", Text: fmt.Sprintf("job %s: unknown jobstatus %d", jobID, r.Jobstatus)}
	}
	return job, nil
}

// WaitJob polls the job PollMin after it is called (a job is not done the
// instant it was submitted, and PollMin is all a job found done costs),
// then on an interval of half the time since it began, within PollMin and
// PollMax, until it ends or ctx is done: a job is seen at most a third of
// its length after its end (and PollMin, PollMax), in a number of polls
// logarithmic in its length up to PollMax. Retryable poll errors are
// retried; a final one is returned. A failed job returns the job and
// job.Err.
func (c *Client) WaitJob(ctx context.Context, jobID string) (Job, error) {
	began := time.Now()
	var lastErr error
	for {
		t := time.NewTimer(min(max(time.Since(began)/2, c.cfg.PollMin), c.cfg.PollMax))
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			text := fmt.Sprintf("wait for job %s: %v", jobID, ctx.Err())
			if lastErr != nil {
				text += " (last poll: " + lastErr.Error() + ")"
			}
			return Job{ID: jobID, Status: JobPending},
				&Error{Command: "queryAsyncJobResult", Text: text, Retryable: true, Err: ctx.Err()}
		}
		job, err := c.QueryJob(ctx, jobID)
		switch {
		case err == nil && job.Status != JobPending:
			return job, job.Err
		case err != nil && !IsRetryable(err):
			return job, err
		case err != nil:
			c.log.Debug("job poll failed, retrying", "job", jobID, "err", err.Error())
		}
		lastErr = err
	}
}
