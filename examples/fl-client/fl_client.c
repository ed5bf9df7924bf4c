/*
 * A federated-learning client for Propeller proplets: a WASI command (wasm32-wasi) that trains a logistic
 * regression with plain SGD and prints the update the proplet posts to the coordinator.
 *
 * Contract (what the proplet gives a task named `fl-round-...`, see docs/federated-learning.md):
 *   MODEL_DATA    the global model, {"w":[...],"b":x} (absent or empty w: start from zeros)
 *   DATASET_DATA  this participant's data, {"x":[[...],...],"y":[0|1,...]}   (required)
 *   HYPERPARAMS   {"epochs":n,"lr":x}   (defaults: 1 epoch, lr 0.1)
 *   ROUND_ID, PROPLET_ID, MODEL_URI   copied into the update
 * Output, one line on stdout:
 *   {"round_id":..,"proplet_id":..,"base_model_uri":..,"num_samples":n,
 *    "metrics":{"loss":L,"loss_before":L0},"update":{"w":[...],"b":x}}
 * where loss_before is the global model's mean log-loss on this data and loss the trained model's.
 * Samples are visited in order (no shuffling), so a given model, dataset and hyperparameters always give the
 * same update. Errors go to stderr with exit status 1.
 *
 * Build: clang-14 --target=wasm32-wasi -O2 -o fl-client.wasm fl_client.c   (Debian: clang-14, lld-14,
 * wasi-libc, libclang-rt-14-dev-wasm32; `make fl-client` does this).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_FEATURES 256
#define MAX_SAMPLES 100000

static void die(const char *what) {
    fprintf(stderr, "fl-client: %s\n", what);
    exit(1);
}

static const char *skip_ws(const char *p) {
    while (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t') p++;
    return p;
}

/* The value after "key": at any depth (our inputs have each key once and no key inside a string). */
static const char *find_key(const char *json, const char *key) {
    char pattern[64];
    snprintf(pattern, sizeof pattern, "\"%s\"", key);
    const char *p = json;
    while (json && (p = strstr(p, pattern)) != NULL) {
        const char *q = skip_ws(p + strlen(pattern));
        if (*q == ':') return skip_ws(q + 1);
        p += strlen(pattern);
    }
    return NULL;
}

static int parse_number(const char **p, double *out) {
    char *end;
    double v = strtod(*p, &end);
    if (end == *p) return 0;
    *out = v;
    *p = skip_ws(end);
    return 1;
}

/* A flat array of numbers at *p into out (at most max); the count, or -1 when it is not one. */
static int parse_array(const char **p, double *out, int max) {
    const char *q = skip_ws(*p);
    if (*q != '[') return -1;
    q = skip_ws(q + 1);
    int n = 0;
    if (*q == ']') {
        *p = q + 1;
        return 0;
    }
    for (;;) {
        double v;
        if (!parse_number(&q, &v)) return -1;
        if (n >= max) return -1;
        out[n++] = v;
        if (*q == ',') {
            q = skip_ws(q + 1);
            continue;
        }
        if (*q == ']') break;
        return -1;
    }
    *p = q + 1;
    return n;
}

/* A string value copied into out (no escapes expected in ids); empty when absent. */
static void env_or_empty(const char *name, char *out, size_t size) {
    const char *v = getenv(name);
    snprintf(out, size, "%s", v ? v : "");
    for (char *c = out; *c; c++)
        if (*c == '"' || *c == '\\') *c = '_';
}

static double sigmoid(double z) { return 1.0 / (1.0 + exp(-z)); }

static double mean_loss(const double *x, const double *y, int n, int d, const double *w, double b) {
    double total = 0.0;
    for (int i = 0; i < n; i++) {
        double z = b;
        for (int j = 0; j < d; j++) z += w[j] * x[i * d + j];
        double p = sigmoid(z);
        const double eps = 1e-12;
        total += -(y[i] * log(p + eps) + (1.0 - y[i]) * log(1.0 - p + eps));
    }
    return n > 0 ? total / n : 0.0;
}

int main(void) {
    static double x[MAX_SAMPLES * 4];
    static double y[MAX_SAMPLES];
    static double row[MAX_FEATURES];
    double w[MAX_FEATURES] = {0};
    double b = 0.0;

    const char *data = getenv("DATASET_DATA");
    if (!data || !*data) die("DATASET_DATA is not set (the proplet fetches it from DATA_STORE_URL)");
    const char *p = find_key(data, "x");
    if (!p || *p != '[') die("DATASET_DATA has no \"x\" array");
    p = skip_ws(p + 1);
    int n = 0, d = -1;
    while (*p == '[') {
        int k = parse_array(&p, row, MAX_FEATURES);
        if (k <= 0) die("DATASET_DATA: each row of \"x\" must be a non-empty array of numbers");
        if (d < 0) d = k;
        if (k != d) die("DATASET_DATA: rows of \"x\" differ in length");
        if ((long)(n + 1) * d > (long)(sizeof x / sizeof x[0])) die("DATASET_DATA is too large");
        memcpy(&x[n * d], row, sizeof(double) * d);
        n++;
        p = skip_ws(p);
        if (*p == ',') p = skip_ws(p + 1);
    }
    if (n == 0) die("DATASET_DATA has no samples");
    p = find_key(data, "y");
    if (!p || parse_array(&p, y, MAX_SAMPLES) != n) die("DATASET_DATA: \"y\" must have one label per row");

    const char *model = getenv("MODEL_DATA");
    if (model && *model) {
        const char *pw = find_key(model, "w");
        if (pw) {
            int k = parse_array(&pw, w, MAX_FEATURES);
            if (k < 0) die("MODEL_DATA: \"w\" must be an array of numbers");
            if (k != 0 && k != d) die("MODEL_DATA: \"w\" and the dataset's rows differ in length");
        }
        const char *pb = find_key(model, "b");
        if (pb && !parse_number(&pb, &b)) die("MODEL_DATA: \"b\" must be a number");
    }

    double lr = 0.1, epochs_f = 1.0;
    const char *hp = getenv("HYPERPARAMS");
    if (hp && *hp) {
        const char *q = find_key(hp, "lr");
        if (!q) q = find_key(hp, "learning_rate");
        if (q && !parse_number(&q, &lr)) die("HYPERPARAMS: lr must be a number");
        q = find_key(hp, "epochs");
        if (q && !parse_number(&q, &epochs_f)) die("HYPERPARAMS: epochs must be a number");
    }
    int epochs = epochs_f < 1.0 ? 1 : (int)epochs_f;

    double before = mean_loss(x, y, n, d, w, b);
    for (int e = 0; e < epochs; e++) {
        for (int i = 0; i < n; i++) {
            double z = b;
            for (int j = 0; j < d; j++) z += w[j] * x[i * d + j];
            double g = sigmoid(z) - y[i];
            for (int j = 0; j < d; j++) w[j] -= lr * g * x[i * d + j];
            b -= lr * g;
        }
    }
    double after = mean_loss(x, y, n, d, w, b);

    char round_id[128], proplet_id[256], model_uri[256];
    env_or_empty("ROUND_ID", round_id, sizeof round_id);
    env_or_empty("PROPLET_ID", proplet_id, sizeof proplet_id);
    env_or_empty("MODEL_URI", model_uri, sizeof model_uri);
    printf("{\"round_id\":\"%s\",\"proplet_id\":\"%s\",\"base_model_uri\":\"%s\",\"num_samples\":%d,"
           "\"metrics\":{\"loss\":%.17g,\"loss_before\":%.17g},\"update\":{\"w\":[",
           round_id, proplet_id, model_uri, n, after, before);
    for (int j = 0; j < d; j++) printf("%s%.17g", j ? "," : "", w[j]);
    printf("],\"b\":%.17g}}\n", b);
    return 0;
}
