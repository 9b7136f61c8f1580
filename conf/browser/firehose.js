/* Firehose for web pages: batches events, sends them when the page is hidden, retries with
 * the same event_id. No dependencies; any browser with fetch and sendBeacon.
 *
 *   <script src="firehose.js"></script>
 *   <script>
 *     var firehose = new Firehose({url: "https://collector.example.com",
 *                                 writeKey: "wk_live_3f9a"});  // or no key: beacons
 *     firehose.track(42, {page: location.pathname});
 *   </script>
 *
 * Events wait in memory until `batchSize` of them are queued or `flushInterval` ms have
 * passed, then go in one POST /events with fetch(..., {keepalive: true}). When the page is
 * hidden (another tab, the tab closed, a link followed) whatever is queued goes at once:
 * with sendBeacon when there is no write key (text/plain, so no CORS preflight), else with
 * fetch keepalive (only fetch can send the X-API-Key header). Both outlive the page.
 *
 * A batch that gets no answer (network error, or an answer CORS hides) or a 429 or 5xx is
 * sent again later, the same events with the same event_ids, which the collector stores
 * once. Retries back off from `retryDelay` to `maxRetryDelay`, or wait for Retry-After.
 * A client error (400, 401, 413) is not retried: the events go to `onError`, as do the
 * refused events of a partial batch. Events still queued when the page is gone (a beacon the
 * browser would not queue, a batch whose answer came too late) are lost: memory is all
 * the snippet has.
 */
(function (global) {
  "use strict";

  var DEFAULTS = {
    url: null,              // the collector, e.g. "https://collector.example.com"
    writeKey: null,         // sent as X-API-Key when COLLECTOR_API_KEYS is on
    batchSize: 50,          // events per POST /events
    flushInterval: 5000,    // ms an event may wait for its batch to fill
    maxBatchBytes: 60000,   // browsers allow 64 KiB of keepalive and beacon bodies in flight
    retryDelay: 1000,       // ms before the first retry, doubled each time...
    maxRetryDelay: 30000,   // ...up to this
    maxQueued: 10000,       // events held at most; past it the oldest go to onError
    onError: null           // function (reason, events): events that will not be sent
  };
  var BEACON_TYPE = "text/plain;charset=UTF-8";

  function uuid4() {
    var crypto = global.crypto;
    if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
    var bytes = crypto.getRandomValues(new Uint8Array(16));  // randomUUID needs https
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    var hex = Array.prototype.map.call(bytes, function (b) {
      return (b + 0x100).toString(16).slice(1);
    }).join("");
    return [hex.slice(0, 8), hex.slice(8, 12), hex.slice(12, 16), hex.slice(16, 20),
            hex.slice(20)].join("-");
  }

  function Firehose(options) {
    var self = this;
    this.options = {};
    Object.keys(DEFAULTS).forEach(function (key) {
      self.options[key] = options && key in options ? options[key] : DEFAULTS[key];
    });
    if (!this.options.url) throw new Error("Firehose: the collector's url is required");
    this.endpoint = String(this.options.url).replace(/\/+$/, "") + "/events";
    this.queue = [];        // events not sent yet, oldest first
    this.inFlight = null;   // the batch being sent, until its answer
    this.failures = 0;      // failed sends in a row
    this.timer = null;
    this.sent = 0;          // events answered 202 or handed to a beacon
    document.addEventListener("visibilitychange", function () {
      if (document.visibilityState === "hidden") self.flushAll();
    });
    global.addEventListener("pagehide", function () { self.flushAll(); });
  }

  /* Queue one event; return its event_id. */
  Firehose.prototype.track = function (userId, metadata) {
    var event = {event_id: uuid4(), user_id: userId, timestamp: new Date().toISOString(),
                 metadata: metadata || {}};
    this.queue.push(event);
    if (this.queue.length > this.options.maxQueued) {
      this._drop("too many events queued", this.queue.splice(0, 1));
    }
    if (this.queue.length >= this.options.batchSize) this.flush();
    else this._schedule(this.options.flushInterval);
    return event.event_id;
  };

  /* Events not yet answered 202. */
  Firehose.prototype.pending = function () {
    return this.queue.length + (this.inFlight ? this.inFlight.length : 0);
  };

  /* Send the next batch now (one at a time); resolve when its answer is handled. */
  Firehose.prototype.flush = function () {
    var self = this;
    if (this.inFlight || !this.queue.length) return Promise.resolve();
    this._cancelTimer();
    var batch = this.inFlight = this._take();
    return this._post(batch).then(function (outcome) {
      self.inFlight = null;
      if (outcome.retry) {
        self.queue = batch.concat(self.queue);  // the same events, the same event_ids
        self.failures += 1;
        self._cancelTimer();  // a later track() may have set one for flushInterval
        var backoff = Math.min(self.options.maxRetryDelay,
                               self.options.retryDelay * Math.pow(2, self.failures - 1));
        self._schedule(outcome.retryAfter ? outcome.retryAfter * 1000 : backoff);
        return;
      }
      self.failures = 0;
      if (self.queue.length >= self.options.batchSize) self.flush();
      else if (self.queue.length) self._schedule(self.options.flushInterval);
    });
  };

  /* Send everything queued at once, as the page is hidden and may be gone next. */
  Firehose.prototype.flushAll = function () {
    this._cancelTimer();
    while (this.queue.length) {
      var batch = this._take();
      var body = JSON.stringify(batch);
      if (!this.options.writeKey && navigator.sendBeacon &&
          navigator.sendBeacon(this.endpoint, new Blob([body], {type: BEACON_TYPE}))) {
        this.sent += batch.length;  // the browser sends it, even after the page is gone
        continue;
      }
      this._sendAlone(batch);
    }
  };

  Firehose.prototype._sendAlone = function (batch) {
    var self = this;
    this._post(batch).then(function (outcome) {
      if (outcome.retry) {  // the page is still there to retry: it was only hidden
        self.queue = batch.concat(self.queue);
        self._schedule(self.options.retryDelay);
      }
    });
  };

  /* Take the oldest events, at most batchSize and maxBatchBytes of JSON (at least one). */
  Firehose.prototype._take = function () {
    var batch = [], bytes = 2;
    while (this.queue.length && batch.length < this.options.batchSize) {
      var size = new TextEncoder().encode(JSON.stringify(this.queue[0])).length + 1;
      if (batch.length && bytes + size > this.options.maxBatchBytes) break;
      batch.push(this.queue.shift());
      bytes += size;
    }
    return batch;
  };

  /* POST a batch; resolve {retry, retryAfter} (never reject). */
  Firehose.prototype._post = function (batch) {
    var self = this;
    var headers = this.options.writeKey
      ? {"Content-Type": "application/json", "X-API-Key": this.options.writeKey}
      : {"Content-Type": BEACON_TYPE};  // a "simple" request: no preflight needed
    return fetch(this.endpoint, {method: "POST", keepalive: true, credentials: "omit",
                                 headers: headers, body: JSON.stringify(batch)})
      .then(function (response) {
        if (response.status === 429 || response.status >= 500) {
          return {retry: true, retryAfter: Number(response.headers.get("Retry-After")) || 0};
        }
        return response.json().catch(function () { return {}; }).then(function (answer) {
          if (response.status === 202) {
            var refused = (answer.refused || []).map(function (r) { return batch[r.index]; });
            self.sent += batch.length - refused.length;
            if (refused.length) self._drop("refused", refused, answer.refused);
          } else {
            self._drop(answer.title || "HTTP " + response.status, batch, answer);
          }
          return {retry: false};
        });
      }, function () {
        return {retry: true, retryAfter: 0};  // no answer, or one CORS does not let us read
      });
  };

  Firehose.prototype._schedule = function (delay) {
    var self = this;
    if (this.timer !== null) return;
    this.timer = setTimeout(function () { self.timer = null; self.flush(); }, delay);
  };

  Firehose.prototype._cancelTimer = function () {
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
  };

  Firehose.prototype._drop = function (reason, events, detail) {
    if (typeof this.options.onError === "function") this.options.onError(reason, events, detail);
  };

  global.Firehose = Firehose;
})(typeof window !== "undefined" ? window : this);
