package cloudsim_test

import (
	"crypto/hmac"
	"crypto/sha1"
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/apache/cloudstack-go/v2/cloudstack"

	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/test/cloudsim"
	"github.com/volumed/volumed/test/simtest"
)

// startSim starts a simulator for the test (see simtest.Start).
func startSim(t testing.TB, cfg cloudsim.Config) *cloudsim.Sim { return simtest.Start(t, cfg) }

// syncClient is cloudstack-go's client that does not wait for jobs.
func syncClient(s *cloudsim.Sim) *cloudstack.CloudStackClient {
	return cloudstack.NewClient(s.URL(), s.APIKey(), s.SecretKey(), false)
}

// asyncClient is cloudstack-go's client that polls jobs to their end.
func asyncClient(s *cloudsim.Sim) *cloudstack.CloudStackClient {
	return cloudstack.NewAsyncClient(s.URL(), s.APIKey(), s.SecretKey(), false)
}

// waitJob polls a job until it ends and returns the last answer.
func waitJob(t *testing.T, cs *cloudstack.CloudStackClient, jobID string) *cloudstack.QueryAsyncJobResultResponse {
	t.Helper()
	var r *cloudstack.QueryAsyncJobResultResponse
	testenv.Eventually(t, 20*time.Second, func() bool {
		var err error
		r, err = cs.Asyncjob.QueryAsyncJobResult(cs.Asyncjob.NewQueryAsyncJobResultParams(jobID))
		if err != nil {
			t.Fatalf("queryAsyncJobResult %s: %v", jobID, err)
		}
		return r.Jobstatus != 0
	}, "job %s ends", jobID)
	return r
}

// createParams are createVolume's parameters for a custom-size volume in
// the simulator's zone.
func createParams(cs *cloudstack.CloudStackClient, name string, sizeGB int64) *cloudstack.CreateVolumeParams {
	p := cs.Volume.NewCreateVolumeParams()
	p.SetName(name)
	p.SetDiskofferingid(cloudsim.CustomOfferingID)
	p.SetZoneid(cloudsim.ZoneID)
	p.SetSize(sizeGB)
	return p
}

// createVolume creates a custom-size volume and waits for its job.
func createVolume(t *testing.T, cs *cloudstack.CloudStackClient, name string, sizeGB int64) string {
	t.Helper()
	r, err := cs.Volume.CreateVolume(createParams(cs, name, sizeGB))
	if err != nil {
		t.Fatalf("createVolume: %v", err)
	}
	if j := waitJob(t, cs, r.JobID); j.Jobstatus != 1 {
		t.Fatalf("createVolume job: %s", j.Jobresult)
	}
	return r.Id
}

// jobError returns a failed job's errortext ("" on success).
func jobError(t *testing.T, j *cloudstack.QueryAsyncJobResultResponse) (int, string) {
	t.Helper()
	if j.Jobstatus == 1 {
		return 0, ""
	}
	var e struct {
		Code int    `json:"errorcode"`
		Text string `json:"errortext"`
	}
	if err := json.Unmarshal(j.Jobresult, &e); err != nil {
		t.Fatalf("job result %s: %v", j.Jobresult, err)
	}
	return e.Code, e.Text
}

// attach submits attachVolume and waits; deviceID < 0 lets CloudStack choose.
func attach(t *testing.T, cs *cloudstack.CloudStackClient, volID, vmID string, deviceID int64) (*cloudstack.QueryAsyncJobResultResponse, string) {
	t.Helper()
	p := cs.Volume.NewAttachVolumeParams(volID, vmID)
	if deviceID >= 0 {
		p.SetDeviceid(deviceID)
	}
	r, err := cs.Volume.AttachVolume(p)
	if err != nil {
		t.Fatalf("attachVolume: %v", err)
	}
	j := waitJob(t, cs, r.JobID)
	_, text := jobError(t, j)
	return j, text
}

// signedRequest sends a request signed like cloudstack-go, with the
// parameters given (apiKey, response, signatureversion, expires included
// only when present in params), and returns status and body.
func signedRequest(t *testing.T, s *cloudsim.Sim, secret string, params url.Values) (int, []byte) {
	t.Helper()
	return signedRequestTampered(t, s, secret, params, nil)
}

func rawGet(t *testing.T, u string) (int, []byte) {
	t.Helper()
	resp, err := http.Get(u)
	if err != nil {
		t.Fatalf("GET: %v", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, b
}

// v3 returns the parameters cloudstack-go sends for a command.
func v3(s *cloudsim.Sim, command string, extra map[string]string) url.Values {
	v := url.Values{}
	v.Set("command", command)
	v.Set("apiKey", s.APIKey())
	v.Set("response", "json")
	v.Set("signatureversion", "3")
	v.Set("expires", time.Now().UTC().Add(15*time.Minute).Format(time.RFC3339))
	for k, x := range extra {
		v.Set(k, x)
	}
	return v
}

// signedRequestTampered signs params, then changes some before sending.
func signedRequestTampered(t *testing.T, s *cloudsim.Sim, secret string, params url.Values, tamper map[string]string) (int, []byte) {
	t.Helper()
	mac := hmac.New(sha1.New, []byte(secret))
	mac.Write([]byte(strings.ToLower(cloudstack.EncodeValues(params))))
	sig := base64.StdEncoding.EncodeToString(mac.Sum(nil))
	for k, v := range tamper {
		params.Set(k, v)
	}
	return rawGet(t, s.URL()+"?"+cloudstack.EncodeValues(params)+"&signature="+url.QueryEscape(sig))
}
