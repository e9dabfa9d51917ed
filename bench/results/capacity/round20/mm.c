// What a UDP send costs here with sendto and with sendmmsg (issue 15, twentieth round;
// output in sendmmsg.txt). usage: mm BATCH
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <time.h>
#include <pthread.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#define NPEERS 256
int rx[NPEERS]; struct sockaddr_in addrs[NPEERS];
volatile int stop=0;
void *drain(void*a){ char buf[2048]; struct mmsghdr m[64]; struct iovec io[64]; char bufs[64][256];
 for(int i=0;i<64;i++){io[i].iov_base=bufs[i];io[i].iov_len=256;memset(&m[i],0,sizeof m[i]);m[i].msg_hdr.msg_iov=&io[i];m[i].msg_hdr.msg_iovlen=1;}
 while(!stop){ for(int p=0;p<NPEERS;p++){ while(recvmmsg(rx[p],m,64,MSG_DONTWAIT,0)>0); } } return 0;}
double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
double cpu(){struct timespec t;clock_gettime(CLOCK_THREAD_CPUTIME_ID,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int argc,char**argv){ int batch=atoi(argv[1]); int N=400000;
 for(int p=0;p<NPEERS;p++){ rx[p]=socket(AF_INET,SOCK_DGRAM,0); int sz=1<<20; setsockopt(rx[p],SOL_SOCKET,SO_RCVBUF,&sz,4);
  struct sockaddr_in a={.sin_family=AF_INET,.sin_addr.s_addr=htonl(0x7f000001)}; bind(rx[p],(void*)&a,sizeof a); socklen_t l=sizeof a; getsockname(rx[p],(void*)&a,&l); addrs[p]=a;}
 int tx=socket(AF_INET,SOCK_DGRAM,0);
 pthread_t th; pthread_create(&th,0,drain,0);
 char payload[80]; memset(payload,1,80);
 struct mmsghdr m[64]; struct iovec io={payload,80};
 for(int i=0;i<64;i++){memset(&m[i],0,sizeof m[i]); m[i].msg_hdr.msg_iov=&io; m[i].msg_hdr.msg_iovlen=1; m[i].msg_hdr.msg_namelen=sizeof(struct sockaddr_in);}
 double c0=cpu(), t0=now(); int k=0;
 for(int i=0;i<N;){ if(batch<=1){ sendto(tx,payload,80,0,(void*)&addrs[k++%NPEERS],sizeof(struct sockaddr_in)); i++; }
   else { for(int j=0;j<batch;j++) m[j].msg_hdr.msg_name=&addrs[k++%NPEERS]; int r=sendmmsg(tx,m,batch,0); i+= r>0?r:1; } }
 double c1=cpu(), t1=now(); stop=1; pthread_join(th,0);
 printf("batch %d: %.2f us cpu/packet, %.2f us wall/packet\n",batch,(c1-c0)/N*1e6,(t1-t0)/N*1e6); }
